"""Replay held-out traces (``experiments/robust.py --trace``) through the studio's own choice of the kept step.

    python experiments/replay_watch.py docs/results/trace_sweep4_gpu.jsonl.gz [more traces ...]

A trace holds, for every held-out check of a run, the watch's per-row rewards on the run's own split and the
accuracy the same adapter scored on held-out rows no run saw. Here each check is scored again from those rewards by
``evaluate.score_result`` and fed in step order to ``watch.Watch.consider`` (the code a run uses, with the default
RunConfig's watch settings), so a change to the rule can be judged against what each check's adapter was really
worth (a check taken once the run had seen a collapse, ``collapse_seen``, is never a candidate, as in
``Watch.check``): per run, the step the rule keeps and its held-out accuracy, next to the step the run kept live (the rule of
the code it ran) and the last one, with the means per setting.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read(paths: list[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    t = json.loads(line)
                    runs.setdefault(f"{Path(path).name.split('.')[0]}: {t.get('run', '')}", []).append(t)
    return runs


def replay(checks: list[dict]):
    """(the kept check, the last check, the check the run kept live) of one run's trace."""
    from studio.config.run import RunConfig
    from studio.training import watch
    from studio.tuned import evaluate

    first = checks[0]["watch"]["rows"]
    rows = [{"prompt": r["prompt"], "completion": "", "label": r["label"]} for r in first]
    w = watch.Watch(RunConfig().updated({"data.eval_max_rows": None}), rows, lambda *a, **k: None)
    live, by_point = None, {}
    for c in sorted(checks, key=lambda c: c["step"]):
        beta = c.get("beta", 0.1)
        scored = c["watch"]["rows"]
        items = [SimpleNamespace(completion_ids=[0] * r["n_tokens"]) for r in scored]
        result = evaluate.score_result(rows, items, list(range(len(rows))), 0, [0.0] * len(rows),
                                       [r["reward"] / beta for r in scored], beta=beta, max_length=None)
        point = watch.Point(c["step"], result)
        by_point[id(point)] = c
        if not c.get("collapse_seen"):  # as Watch.check: no check after a collapse is seen is a step to keep
            w.consider(point)
        if c.get("kept_now"):
            live = c
    kept = by_point[id(w.best)] if w.best is not None else None
    return kept, checks[-1], live


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    a = ap.parse_args()
    groups: dict[str, list[tuple]] = {}
    for name, checks in sorted(read(a.traces).items()):
        kept, last, live = replay(checks)
        groups.setdefault(re.sub(r"-s\d+(?=-|$)", "", name), []).append((name, kept, last, live))

    def cell(c):
        if c is None:
            return "–"
        return f"{c['step']}: {100 * c['heldout']['accuracy']:.1f}% / {c['heldout']['drift']:+.2f}"

    print("| run | kept by this rule | kept live | last check |\n|---|---|---|---|")
    for group, items in groups.items():
        for name, kept, last, live in items:
            print(f"| {name} | {cell(kept)} | {cell(live)} | {cell(last)} |")
        means = []
        for i in (1, 3, 2):
            xs = [it[i]["heldout"]["accuracy"] for it in items if it[i] is not None]
            means.append(f"{100 * sum(xs) / len(xs):.1f}%" if xs else "–")
        print(f"| **{group}, mean** | **{means[0]}** | **{means[1]}** | **{means[2]}** |")


if __name__ == "__main__":
    main()
