"""Does the default first CPU run learn? The Data tab's save and the CPU card's plan, then the run, without a browser.

    python bench/first_run_learns.py [--data FILE|sample] [--hold-out 0.1] [--float32] [--set FIELD=VALUE ...]

The file is loaded and saved as the Data tab does (cleaned, ``--hold-out`` of the prompts held out), the run config is
the one the Model tab plans for the CPU card with the standard recipe (``--float32``: for a CPU without native bf16,
``model.dtype: float32``), ``--set`` changes it after the plan (to compare settings), and the run goes through the
engine. Printed, one JSON line: the plan (max_length, rows a step, steps, held-out rows, watch cadence, learning rate),
the predicted and the measured seconds, the held-out verdict with its accuracy ± one standard error over pairs, the
margin, the desirable completions' log-prob per token under the base and the tuned model (a collapsed model can rank
pairs well while that falls by nats), and the held-out checks during training. On a GPU machine the same plan trains
on the GPU (for the learning figures only; its seconds say nothing of a CPU's). Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample",
                    help="a data file, or 'sample' (default): the studio's bundled sample, what a new user's first run "
                         "trains on, and on every clone (the HH file is ../shared/data/hh-harmless-dev.jsonl.gz here)")
    ap.add_argument("--hold-out", type=float, default=0.1)
    ap.add_argument("--float32", action="store_true", help="plan and train as on a CPU without native bf16")
    ap.add_argument("--set", action="append", default=[], help="FIELD=VALUE after the plan (repeatable)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    if a.float32:
        os.environ["KTO_STUDIO_CPU_BF16"] = "0"
    work = Path(a.work or tempfile.mkdtemp(prefix="kto-learns-"))
    os.environ.setdefault("KTO_STUDIO_HOME", str(work / "home"))

    from studio.config.run import RunConfig, parse_sets
    from studio.data.clean import CleanOptions
    from studio.data.workbench import Workbench
    from studio.models.load import DeviceInfo, detect_device
    from studio.training import plan
    from studio.training.engine import Engine
    from studio.tuned import evaluate

    wb = Workbench.load(a.data)
    saved = wb.save(CleanOptions(), a.hold_out, 42)
    cfg = RunConfig().updated({"data.train_file": saved["train_file"], "data.eval_file": saved["eval_file"],
                               "data.eval_fraction": 0.0 if saved["eval_file"] else 0.05})
    device = detect_device()
    cpu = device if device.kind == "cpu" else DeviceInfo(kind="cpu", name="cpu", bf16=False)
    planned = plan.plan(cfg, "cpu", cpu, recipe_key="standard")
    cfg = planned.config.updated({"name": "first-run", "output_dir": str(work / "run")})
    if a.float32:
        cfg = cfg.updated({"model.dtype": "float32"})
    if device.kind == "cuda":  # the CPU plan's batch as it is (no filling of a big card)
        cfg = cfg.updated({"memory.fill_card": False, "model.dtype": "float32"})
    cfg = cfg.updated(parse_sets(a.set))
    from studio.training import duration

    predicted = duration.estimate(cfg, duration.data_lengths(cfg), device=cpu)
    engine = Engine()
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    wall = time.time() - t0
    result = evaluate.read_eval(job.run_dir) or {}
    rw = result.get("rewards") or {}
    base, tuned = result.get("base") or {}, result.get("tuned") or {}
    # seconds by phase, measured (from the run's phase events) against predicted (duration.estimate's terms)
    # (a scoring phase ends with its last row: the time after it, until the next phase event, is training's)
    phases: dict[str, float] = {}
    marks, seen = [], set()
    for e in job.events:
        if e["type"] == "phase":
            marks.append((e["time"], e["phase"]))
            seen.add(e["phase"])
            if e["phase"] == "scoring" and e.get("total") and e.get("done") == e["total"]:
                marks.append((e["time"], "training" if "training" in seen else "between"))
    marks.append((t0 + wall, "end"))
    for (t_a, name), (t_b, _) in zip(marks, marks[1:]):
        phases[name] = round(phases.get(name, 0.0) + t_b - t_a, 1)
    phases["before the first phase"] = round(marks[0][0] - t0, 1)
    predicted_phases = {k: round(getattr(predicted, k), 1) for k in
                        ("startup_s", "reference_s", "train_s", "eval_s", "save_s", "step_s")} if predicted else {}
    points = [{k: m.get(k) for k in ("step", "heldout/accuracy", "heldout/drift", "heldout/margin")}
              for m in job.metrics() if "heldout/accuracy" in m]
    watch = next((e for e in job.events if e.get("watch_every") is not None), {})
    t = cfg.train
    print("RESULT " + json.dumps({
        "label": a.label, "data": Path(a.data).name, "state": job.state, "error": job.error,
        "train_rows": saved["train_rows"], "eval_rows": saved["eval_rows"], "max_length": cfg.kto.max_length,
        "rows_per_step": t.per_device_train_batch_size * t.gradient_accumulation_steps, "max_steps": t.max_steps,
        "lr": t.learning_rate, "eval_max_rows": cfg.data.eval_max_rows, "watch_every": watch.get("watch_every"),
        "predicted_s": round(predicted.total_s) if predicted else None, "wall_s": round(wall),
        "measured_phases_s": phases, "predicted_phases_s": predicted_phases,
        "verdict": (result.get("verdict") or {}).get("word"), "n_pairs": result.get("n_pairs"),
        "acc": rw.get("pair_accuracy"), "acc_se": rw.get("pair_accuracy_se"), "margin": rw.get("margin"),
        "logp_tok_des_base": base.get("logp_per_token_desirable"),
        "logp_tok_des_tuned": tuned.get("logp_per_token_desirable"), "drift": result.get("drift"),
        "points": points, "sets": a.set}), flush=True)


if __name__ == "__main__":
    main()
