"""The layout shows the architecture: subpackages by concern whose imports run one way, each module importable on
its own, and no module of the core grown past what one file should hold."""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "studio"
# lowest first: a unit may import only from units before it (or itself)
LAYERS = [
    ("errors",),            # the error base class
    ("atomic",),            # the one atomic-write helper
    ("paths",),             # the studio home
    ("config",),            # the run description and presets
    ("models",),            # models and where they come from
    ("data",),              # reading, cleaning, inspecting data
    ("safepaths",),         # what the UI may read and write
    ("runs",),              # run folders, locks, checkpoints, history
    ("tuned",),             # chat, evaluation, export, votes
    ("training",),          # plan, engine, TRL seam, memory, health
    ("ui", "cli", "__main__", "studio"),  # the two front ends
]
RANK = {u: i for i, layer in enumerate(LAYERS) for u in layer}


def _modules() -> list[str]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "studio"


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> where, for every import of the project's own modules, including the ones
    inside functions."""
    edges: dict[tuple[str, str], list[str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        src = _unit(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "studio":
                targets = ([f"studio.{a.name}" for a in node.names] if node.module == "studio" else [node.module])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "studio"]
            else:
                continue
            for t in targets:
                dst = _unit(t)
                if dst != src:
                    edges.setdefault((src, dst), []).append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return edges


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(RANK), f"place these in LAYERS (tests/test_layout.py): {sorted(units - set(RANK))}"


def test_imports_between_subpackages_run_one_way():
    upward = [f"{src} -> {dst} ({', '.join(where)})" for (src, dst), where in _edges().items()
              if RANK.get(dst, -1) > RANK.get(src, -1)]
    assert not upward, "imports against the layering (a lower layer importing a higher one):\n" + "\n".join(upward)


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk of ``graph`` meets, as 'a -> b -> a'."""
    circles: list[str] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                circles.append(" -> ".join(path[path.index(v):] + [v]))
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return circles


def test_no_import_circle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    circles = _circles(graph)
    assert not circles, "import circles between subpackages:\n" + "\n".join(circles)


def _module_edges() -> dict[str, set[str]]:
    """module -> the project's modules it imports from the same subpackage (imports inside functions too)."""
    mods = set(_modules())
    graph: dict[str, set[str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        src = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "studio":
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "studio"]
            else:
                continue
            for t in targets:
                if t in mods and t != src and len(t.split(".")) > 2 and len(src.split(".")) > 2 \
                        and t.split(".")[1] == src.split(".")[1]:
                    graph.setdefault(src, set()).add(t)
    return graph


def test_no_import_circle_between_modules_of_one_subpackage():
    """Inside a subpackage too, imports run one way (e.g. tuned/gguf_writer.py takes ExportError from
    tuned/merge.py, not from tuned/export.py, which imports gguf_writer)."""
    graph = _module_edges()
    circles = _circles(graph)
    assert graph, "no imports found between modules of one subpackage: the test reads nothing"
    assert not circles, "import circles inside a subpackage:\n" + "\n".join(circles)


def test_each_module_imports_on_its_own():
    """A fresh interpreter per module: an import that only works after another module was imported fails here."""
    mods = [m for m in _modules() if m != "studio.__main__"]

    def one(m: str) -> tuple[str, str | None]:
        p = subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        return m, None if p.returncode == 0 else p.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [f"{m}: {err}" for m, err in pool.map(one, mods) if err]
    assert not failed, "\n".join(failed)


MAX_LINES = 450
# one cohesive thing each, longer than MAX_LINES on purpose: say why
COHESIVE = {
    "studio/ui/train_tab.py": "one tab, one file (the UI's rule): its layout, handlers and run-history views",
    "studio/ui/data_tab.py": "one tab, one file (the UI's rule): upload, inspect, fix labels, balance, save",
    "studio/runs/folder.py": "the one reader and writer of every file in a run folder (one section per file, the "
                             "event log and the stop request included): the rule is one module for them",
    "studio/cli.py": "the headless front end: one parser, one command function per subcommand and its progress bar",
    "studio/training/engine.py": "one training job from Start to 'done': build, train, report, fail, release",
}


def test_no_module_of_the_core_grows_past_one_files_worth():
    long = []
    for f in sorted(PKG.rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        n = len(f.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in COHESIVE:
            long.append(f"{rel}: {n} lines")
    assert not long, f"over {MAX_LINES} lines (split by concern, or list in COHESIVE with the reason):\n" + "\n".join(long)
