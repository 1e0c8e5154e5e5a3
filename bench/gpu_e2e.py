"""The 8 GB card, end to end, through the tabs' own handlers: data -> plan -> train (watch, Stop, Resume, a page
reload while it runs) -> chat base vs tuned -> one A/B vote -> held-out evaluation -> every export, loaded back.

    python bench/gpu_e2e.py --work /tmp/e2e                   # CUDA: Llama-3.1-8B, Mistral-7B, Qwen2.5-7B x 16-bit, NF4
    python bench/gpu_e2e.py --work /tmp/e2e --layers 4        # the same architectures with 4 decoder layers
    python bench/gpu_e2e.py --tiny --work /tmp/e2e-cpu        # tiny configs on a CPU: a test of this script

Each architecture is built with random weights from its real config (hidden size, heads, vocabulary, rope; ``--layers``
replaces only the number of decoder layers) and a byte-level tokenizer with a chat template
(``bench/export_models.py``), stored in bf16 and as a pre-quantized bitsandbytes NF4 copy (double quant, as the
``unsloth/*-bnb-4bit`` repos are). Every (architecture, storage form) runs in a process of its own with the CUDA
allocator capped at ``--cap-gib`` (7.5: an 8 GB card) and a studio home of its own, and drives the app that
``python app.py`` builds (``studio.ui.app.build_app``) through ``bench/ui_driver.py``: the events fire the handlers the
tabs wire to their components, with the values a page would send.

Printed: one table row per step (ok, seconds, peak GiB allocated during the step), the plan's predicted peak against
the training's measured one, and ``RESULT {json}``; the exit code is the number of failed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = ("llama3.1-8b", "mistral-7b", "qwen2.5-7b")
TINY = {"llama3.1-8b": "llama", "mistral-7b": "mistral", "qwen2.5-7b": "qwen2"}
GIB = 2**30
WORDS = ("apple river stone cloud music garden window paper light forest silver candle market bridge winter summer "
         "ocean mountain letter story yellow quiet gentle honest clever simple careful bright").split()


# ---- models and data -------------------------------------------------------------------------------------------

def build_bases(arch: str, work: Path, layers: int | None, tiny: bool, forms: list[str]) -> dict[str, str]:
    """{form: checkpoint folder} of ``arch`` with random weights: '16-bit' (bf16) and 'nf4' (pre-quantized)."""
    import torch

    from bench import export_models
    from bench.random_models import ARCHS as REAL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = export_models.tokenizer()
    if tiny:
        spec = dict(export_models.TINY[TINY[arch]], vocab_size=len(tok))
    else:
        spec = dict(REAL[arch])
        spec.pop("original_max_position_embeddings", None)
        if layers:
            spec["num_hidden_layers"] = layers
    name = arch + (f"-{layers}l" if layers and not tiny else "") + ("-tiny" if tiny else "")
    out = {"16-bit": export_models.base_model(name, str(work / "models"), spec=spec, device=device)}
    if "nf4" in forms:
        out["nf4"] = export_models.quantize_nf4(out["16-bit"], str(work / "models" / (name + "-nf4")))
    return out


def write_data(path: Path, n_prompts: int = 48, seed: int = 0) -> Path:
    """Preference pairs (prompt, chosen, rejected) of plain words: the Data tab turns them into KTO rows."""
    rnd = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_prompts):
            topic = rnd.choice(WORDS)
            good = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 24)))
            bad = " ".join(rnd.choice(WORDS[:6]) for _ in range(rnd.randint(4, 12)))
            f.write(json.dumps({"prompt": f"Tell me something about the {topic} number {i}.",
                                "chosen": f"The {topic} is {good}.", "rejected": f"No. {bad}"}) + "\n")
    return path


# ---- one (architecture, storage form), in its own process ------------------------------------------------------

class Steps:
    def __init__(self, label: str):
        self.label, self.rows = label, []

    def run(self, name: str, fn):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        row = {"combo": self.label, "step": name, "ok": False}
        try:
            detail = fn()
            row.update(ok=True, detail=detail)
        except Exception as e:  # noqa: BLE001 - a failed step is a row, the next steps still run where they can
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        row["s"] = round(time.time() - t, 1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None
        self.rows.append(row)
        print(f"[{self.label}] {name}: {'ok' if row['ok'] else 'FAILED ' + row['error']} ({row['s']} s, "
              f"peak {row['peak_gib']} GiB) {json.dumps(row.get('detail'), default=str)[:400]}", flush=True)
        return row["ok"]


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _md(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def child(arch: str, form: str, base: str, work: Path, cap_gib: float, steps_total: int,
          skip: frozenset = frozenset()) -> list[dict]:
    import torch

    home = work / f"home-{arch}-{form}"
    shutil.rmtree(home, ignore_errors=True)
    os.environ["KTO_STUDIO_HOME"] = str(home)
    cuda = torch.cuda.is_available()
    if cuda:  # an 8 GB card: the studio's plans and the allocator both get 7.5 GiB
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
        if os.environ.get("E2E_MEMORY_HISTORY") == "1":  # where a finished run's leftovers were allocated
            torch.cuda.memory._record_memory_history(enabled="state", stacks="python")
    from bench.ui_driver import Page
    from studio import safepaths
    from studio.config.run import RunConfig
    from studio.ui.app import Studio, build_app

    safepaths.allow([str(Path(base).parent)])  # as `python app.py --allow-path MODELS` lets the page name the models

    s = Steps(f"{arch}/{form}")
    app = build_app(Studio(RunConfig()))
    studio = app.studio
    page = Page(app)
    info: dict = {}

    def data():
        f = write_data(home / "data" / "e2e_pairs.jsonl")
        page.fire("data-load", **{"data-path": str(f), "data-model": base, "data-max-length": 256})
        summary = _md(page.get("data-summary"))
        _need("KTO rows" in summary, f"data not loaded: {summary[:300]}")
        page.fire("data-save")
        saved = _md(page.get("data-saved"))
        _need(saved.startswith("**Saved"), f"not saved: {saved[:300]}")
        return {"train_file": studio.config.data.train_file}

    def plan():
        page.fire("cfg-model-name_or_path", "input", **{"cfg-model-name_or_path": base})
        if cuda:
            page.fire("gpu-preset", "input", **{"gpu-preset": "8gb"})
        fit = _md(page.get("fit-settings"))
        from studio.models import load as models
        from studio.training import plan as planner

        p = planner.plan_run(studio.config, models.detect_device(), fetch=False)
        info["plan"] = p
        _need(studio.config.model.name_or_path == base, f"model is {studio.config.model.name_or_path}")
        if cuda:
            _need(p.backend == "bnb", f"path {p.backend}, not bitsandbytes")
            _need(p.peak_gib is not None and p.peak_gib <= cap_gib, f"planned peak {p.peak_gib} over {cap_gib}")
        return {"path": p.backend, "planned_peak_gib": p.peak_gib, "batch": p.batch, "accumulation": p.accumulation,
                "max_length": p.max_length, "fit": fit[:200]}

    def train_tab():
        """The Train tab shown (its form reloads from the config the other tabs set), with a short run's settings."""
        tab = next(b for b in app.blocks.values() if type(b).__name__ == "Tab" and getattr(b, "label", "") == "Train")
        page.fire_block(tab, "select")
        page.fire("run-name", "input", **{"run-name": f"e2e-{form}"}) if page.has_handler("run-name", "input") \
            else page.set("run-name", f"e2e-{form}")
        for field, value in (("train.max_steps", steps_total), ("train.save_steps", 3), ("kto.max_length", 256)):
            eid = "cfg-" + field.replace(".", "-")
            page.set(eid, value)
            if page.has_handler(eid, "input"):
                page.fire(eid, "input")
        studio.update({"watch.every_steps": 2})  # several held-out checks in a short run (the tab has no field)
        return {"form_max_steps": page.get("cfg-train-max_steps")}

    def wait(states: tuple[str, ...], until=None, timeout: float = 900) -> str:
        t = time.time()
        viewer = page
        while time.time() - t < timeout:
            viewer.fire_timers()
            text = _md(viewer.get("train-status"))
            if until is not None and until():
                return text
            if any(st in text for st in states):
                return text
            time.sleep(1.0)
        raise TimeoutError(f"still not {states} after {timeout} s: {_md(page.get('train-status'))[:300]}")

    def metrics() -> list[dict]:
        from studio.runs import folder

        run_dir = studio.config.run_dir()
        return folder.read_metrics(run_dir) if hasattr(folder, "read_metrics") else []

    def start_stop():
        info["mem_before"] = torch.cuda.memory_allocated() if cuda else None
        page.fire("train-start")
        msg = _md(page.get("train-message"))
        _need("Started" in msg, f"not started: {msg[:300]}")
        info["run_dir"] = studio.config.run_dir()
        # a page opened while it runs attaches to the live run
        wait(("training",), until=lambda: _step() >= 2, timeout=900)
        fresh = Page(app)
        fresh.fire_timers()
        seen = _md(fresh.get("train-status"))
        _need("training" in seen or "🏃" in seen, f"a reloaded page shows {seen[:200]}")
        page.fire("train-stop")
        text = wait(("⏹ stopped", "❌ failed", "✅ finished"))
        _need("stopped" in text, f"stop ended as {text[:300]}")
        stopped = _step()
        _need(stopped < steps_total, f"stopped only at the end (step {stopped} of {steps_total})")
        return {"stopped_at": stopped, "reload_saw": seen[:120]}

    def _step() -> int:
        m = [e for e in metrics() if "loss" in e]
        return max((int(e["step"]) for e in m), default=0)

    def resume():
        page.fire("train-resume")
        msg = _md(page.get("train-message"))
        _need("Resuming" in msg, f"not resumed: {msg[:300]}")
        text = wait(("✅ finished", "❌ failed", "⏹ stopped"), timeout=1200)
        _need("finished" in text, f"ended as {text[:400]}")
        m = metrics()
        checks = [e for e in m if "heldout/accuracy" in e]
        _need(len(checks) >= 1, "no held-out watch check was logged")
        adapter = Path(info["run_dir"]) / "adapter"
        _need((adapter / "adapter_model.safetensors").is_file(), "no adapter saved")
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
        import gc

        studio.engine.wait(120)  # 'done' is written once the run's memory is released; the thread ends right after
        gc.collect()
        after = torch.cuda.memory_allocated() if cuda else None
        _need(_step() == steps_total, f"resumed run ended at step {_step()}, not {steps_total}")
        out = {"steps": _step(), "watch_checks": len(checks), "train_peak_gib": round(peak, 2) if peak else None,
               "planned_peak_gib": info["plan"].peak_gib,
               "allocated_before_mib": None if after is None else round(info["mem_before"] / 2**20, 1),
               "allocated_after_mib": None if after is None else round(after / 2**20, 1)}
        if cuda:
            _need(peak <= cap_gib, f"training peaked at {peak:.2f} GiB, over the {cap_gib} GiB card")
            _need(peak <= info["plan"].peak_gib * 1.10, f"training peaked at {peak:.2f} GiB, more than the "
                                                         f"predicted {info['plan'].peak_gib} + 10%")
        info["mem_after"] = after
        return out

    def memory_given_back():
        if not cuda:
            return {"skipped": "no GPU"}
        raw = (info["mem_after"] - info["mem_before"]) / 2**20
        # the process's cuBLAS workspaces (64 MiB on an H100), made by its first matrix multiply and reused by every
        # later one, belong to no run: measured without them (torch frees them on request; the next matmul remakes them)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        left = (torch.cuda.memory_allocated() - info["mem_before"]) / 2**20
        from studio.runs import folder as run_folder

        # what the engine found and emptied in place (studio.models.leftovers), with who held the model
        found = [e for e in run_folder.read_events(info["run_dir"])[0] if e.get("type") == "memory"]
        if left > 64:
            from studio.models import leftovers

            raise AssertionError(f"the finished run left {left:.0f} MiB allocated; the engine saw {found}; "
                                 f"now allocated by: {leftovers.allocation_sites()}")
        return {"allocated_before_mib": round(info["mem_before"] / 2**20, 1), "left_mib": round(left, 1),
                "left_with_cublas_workspaces_mib": round(raw, 1),
                "engine_released": found}

    def chat():
        page.fire("chat-refresh")
        adapter = page.get("chat-adapter")
        _need(bool(adapter), "the Chat tab lists no adapter")
        page.fire("chat-send", **{"chat-input": "Tell me something about the river.", "chat-max-new": 24,
                                  "chat-temperature": 0.0})
        base_h, tuned_h = page.get("chat-base") or [], page.get("chat-tuned") or []
        _need(base_h and tuned_h and base_h[-1]["role"] == "assistant" and tuned_h[-1]["role"] == "assistant",
              f"no replies: {str(page.get('chat-status'))[:300]}")
        from studio.tuned.chat import build_messages

        cm = studio.chat
        msgs = build_messages([], "Tell me something about the river.")
        lb, lt, lb2 = cm.logits(msgs, False), cm.logits(msgs, True), cm.logits(msgs, False)
        change = float((lt - lb).abs().max())
        _need(change > 0, "the adapter changes nothing")
        _need(bool(torch.equal(lb, lb2)), "switching the adapter off does not give the base back")
        return {"adapter": adapter, "quantized": getattr(cm.key, "quantized", None), "max_logit_change": change,
                "base_reply": str(base_h[-1]["content"])[:60], "tuned_reply": str(tuned_h[-1]["content"])[:60]}

    def ab_vote():
        page.fire("ab-refresh")
        page.fire("ab-ask", **{"ab-input": "Say something about the garden.", "ab-max-new": 16})
        page.fire("ab-vote-a")
        reveal = _md(page.get("ab-reveal"))
        _need("Vote #" in reveal, f"no vote stored: {reveal[:300]} / {_md(page.get('ab-status'))[:300]}")
        return {"reveal": reveal[:160]}

    def evaluate():
        page.fire("chat-eval-run")
        text = _md(page.get("chat-eval-status"))
        _need(not text.startswith("❌") and text.strip(), f"evaluation: {text[:300]}")
        return {"status": text[:200]}

    def export(fmt: str, gguf_type: str | None = None):
        def go():
            values = {"chat-export-format": fmt, "chat-export-out": f"e2e-{form}-{fmt}-{gguf_type or ''}".strip("-")}
            if gguf_type:
                values["chat-export-gguf-type"] = gguf_type
            page.fire("chat-export-format", "change", **values) if page.has_handler("chat-export-format", "change") \
                else None
            size = _md(page.get("chat-export-size"))
            page.fire("chat-export-run", **values)
            text = _md(page.get("chat-export-result"))
            _need(text.startswith("✅"), f"export {fmt}: {text[:400]}")
            written = [ln for ln in text.splitlines() if "written to" in ln]
            target = home / "exports" / values["chat-export-out"]
            nbytes = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.exists() else None
            shutil.rmtree(target, ignore_errors=True)  # the disk holds one export at a time
            return {"size_shown": size[:120], "bytes": nbytes, "result": (written or [text])[0][:160]}
        return go

    for name, fn in (("data", data), ("plan", plan), ("train tab", train_tab), ("start, reload, stop", start_stop),
                     ("resume to the end", resume), ("GPU memory given back", memory_given_back),
                     ("chat base vs tuned", chat), ("A/B vote", ab_vote),
                     ("evaluation", evaluate), ("export adapter", export("adapter")),
                     ("export merged", export("merged")), ("export gguf q8_0", export("gguf", "q8_0")),
                     ("export gguf 4-bit", export("gguf", "q4_k_m")), ("export gguf-adapter", export("gguf-adapter"))):
        if name in skip:
            continue
        if not s.run(name, fn) and name in ("data", "plan", "start, reload, stop", "resume to the end"):
            break  # later steps need this one
    studio.engine.stop() if getattr(studio.engine, "busy", False) else None
    return s.rows


# ---- orchestration ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gpu_e2e")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--forms", default="16-bit,nf4")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real config's)")
    ap.add_argument("--cap-gib", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of the run (stopped at 4, resumed)")
    ap.add_argument("--parallel", type=int, default=2, help="combinations at once (each capped at --cap-gib)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on a CPU (a test of this script)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: stop what still runs then, and say so")
    ap.add_argument("--skip", default="", help="steps to leave out, comma-separated names from the table (a short "
                                               "device call re-checking the others)")
    ap.add_argument("--child", nargs=3, metavar=("ARCH", "FORM", "BASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        arch, form, base = args.child
        rows = child(arch, form, base, work, args.cap_gib, args.steps,
                     frozenset(x.strip() for x in args.skip.split(",") if x.strip()))
        (work / f"result-{arch}-{form}.json").write_text(json.dumps(rows, default=str))
        return sum(not r["ok"] for r in rows)

    forms = args.forms.split(",")
    jobs, rows = [], []
    t0 = time.time()
    for arch in args.archs.split(","):
        t = time.time()
        bases = build_bases(arch, work, args.layers, args.tiny, forms)
        rows.append({"combo": arch, "step": "build random-weight checkpoints", "ok": True, "s": round(time.time() - t, 1),
                     "peak_gib": None, "detail": bases})
        print(f"built {arch}: {bases} in {time.time() - t:.0f} s", flush=True)
        jobs += [(arch, form, bases[form]) for form in forms]
    running: list = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    while jobs or running:
        if args.deadline and time.time() - t0 > args.deadline:
            for arch, form, proc, log in running:
                proc.kill()
                log.close()
                rows.append({"combo": f"{arch}/{form}", "step": "process", "ok": False, "s": None, "peak_gib": None,
                             "error": f"stopped at the {args.deadline:.0f} s deadline"})
            for arch, form, _ in jobs:
                rows.append({"combo": f"{arch}/{form}", "step": "process", "ok": False, "s": None, "peak_gib": None,
                             "error": "not started before the deadline"})
            running, jobs = [], []
            break
        while jobs and len(running) < args.parallel:
            arch, form, base = jobs.pop(0)
            log = open(work / f"log-{arch}-{form}.txt", "w")
            cmd = [sys.executable, __file__, "--work", str(work), "--cap-gib", str(args.cap_gib), "--steps",
                   str(args.steps), "--skip", args.skip, "--child", arch, form, base]
            running.append((arch, form, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            arch, form, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                f = work / f"result-{arch}-{form}.json"
                if f.is_file():
                    rows += json.loads(f.read_text())
                else:
                    tail = (work / f"log-{arch}-{form}.txt").read_text()[-2000:]
                    rows.append({"combo": f"{arch}/{form}", "step": "process", "ok": False, "s": None,
                                 "peak_gib": None, "error": f"exit {proc.returncode}: {tail}"})
    print(f"\n{'combination':<22} {'step':<28} {'ok':<4} {'s':>7} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['combo']:<22} {r['step']:<28} {'ok' if r['ok'] else 'FAIL':<4} {r['s'] if r['s'] is not None else '':>7} "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '':>9}")
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} steps ok in {time.time() - t0:.0f} s")
    print("RESULT " + json.dumps(rows, default=str))
    return failed


if __name__ == "__main__":
    sys.exit(main())
