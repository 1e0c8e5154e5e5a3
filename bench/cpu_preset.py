"""The CPU preset's run on 100 HH pairs, start -> saved adapter, on this machine (issue 19's CPU figure; the
earlier figure in docs/RECIPES.md's CPU row: 380 s of training + 50 s of scoring at batch 4 x 4, max_length 384,
gradient checkpointing). Prints figures; asserts nothing.

    python bench/cpu_preset.py --data ../shared/data/hh-harmless-dev.jsonl.gz [--pairs 100] [--heldout 58]

The first ``--pairs`` prompts (a desirable and an undesirable reply each) train, the next ``--heldout`` prompts are
the held-out rows. The run config is the default one planned for the 'cpu' card exactly as the Model tab plans it
(max_length from the data, 8 rows a step, no checkpointing where RAM allows, at most 48 of the held-out rows scored,
a step cap that keeps training + scoring near 4 minutes). Printed:
the planned settings, the wall time from engine start to the saved adapter, training seconds, steps, and the
held-out result (reward accuracy over pairs ± one standard error, desirable drift per token). Other work on the
machine slows it down: run it alone and say so with the figure.
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


def split_pairs(source: str, pairs: int, heldout: int, work: Path) -> tuple[Path, Path]:
    from studio.data import load_kto
    from studio.data.clean import prompt_key, write_jsonl

    rows = load_kto(source, strict=False).rows
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(prompt_key(r["prompt"]), []).append(r)
    both = [g for g in groups.values() if {r["label"] for r in g} == {True, False}]
    train = [r for g in both[:pairs] for r in g]
    held = [r for g in both[pairs:pairs + heldout] for r in g]
    return (write_jsonl(train, work / "train.jsonl", overwrite=True),
            write_jsonl(held, work / "heldout.jsonl", overwrite=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="HH-style preference pairs (e.g. hh-harmless-dev.jsonl.gz)")
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--heldout", type=int, default=58)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kto-cpu-preset-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KTO_STUDIO_HOME", str(work / "home"))

    from studio.config.run import RunConfig
    from studio.models.load import detect_device
    from studio.training import plan
    from studio.training.engine import Engine
    from studio.tuned import evaluate

    train, held = split_pairs(a.data, a.pairs, a.heldout, work)
    cfg = RunConfig().updated({"name": "cpu-preset", "output_dir": str(work / "run"), "data.train_file": str(train),
                               "data.eval_file": str(held), "data.eval_max_rows": 10_000})
    planned = plan.plan(cfg, "cpu", detect_device(), recipe_key="standard")
    cfg = planned.config
    t = cfg.train
    settings = {"max_length": cfg.kto.max_length, "batch": t.per_device_train_batch_size,
                "accumulation": t.gradient_accumulation_steps, "max_steps": t.max_steps,
                "gradient_checkpointing": t.gradient_checkpointing, "lr": t.learning_rate,
                "expected": planned.duration.describe() if planned.duration else None}
    print("planned:", json.dumps(settings), flush=True)
    engine = Engine()
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    wall = time.time() - t0
    result = evaluate.read_eval(job.run_dir) or {}
    rewards = result.get("rewards") or {}
    steps = max((m.get("step", 0) for m in job.metrics()), default=0)
    train_s = next((m["train_runtime"] for m in job.metrics() if "train_runtime" in m), None)
    print(json.dumps({
        "state": job.state, "error": job.error, "cores": os.cpu_count(), "rows": 2 * a.pairs,
        "wall_start_to_adapter_s": round(wall, 1), "train_runtime_s": train_s, "steps": steps,
        "heldout_pairs": result.get("n_pairs"), "reward_accuracy": rewards.get("pair_accuracy"),
        "reward_accuracy_se": rewards.get("pair_accuracy_se"), "margin": rewards.get("margin"),
        "desirable_drift_per_token": result.get("drift"), "earlier_figure": "380 s training + 50 s scoring",
        **settings}, indent=2))


if __name__ == "__main__":
    main()
