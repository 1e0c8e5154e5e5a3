"""What the held-out watch adds to a run's wall time (issue 15: under 10%). Prints figures; asserts nothing.

    python bench/watch_overhead.py --work /tmp/wo                                  # GPU: default config, HH dev file
    python bench/watch_overhead.py --work /tmp/wo --limit 64 --eval-rows 32 \\
        --set train.max_steps=8 --set kto.max_length=64 --set train.gradient_checkpointing=false    # CPU, tiny

Two runs train the same rows with the same seed (the split of experiments/robust.py): one with the held-out rows as
its eval file (the watch scores them once with the base model, every watch.every_steps steps with the tuned model,
and keeps the best step), one without held-out rows. Printed: both wall times (engine start to done), the ratio,
the watch's scoring time (from its 'phase' events), the number of checks and the steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(cfg) -> dict:
    from studio.training.engine import Engine

    engine = Engine()
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    wall = time.time() - t0
    scoring, start = 0.0, None
    for e in job.events:  # a scoring phase runs from its done=0 event to its done=total event
        if e["type"] == "phase" and e.get("phase") == "scoring":
            if e["done"] == 0:
                start = e["time"]
            elif e["done"] >= e["total"] and start is not None:
                scoring += e["time"] - start
                start = None
    checks = sum(1 for m in job.metrics() if "heldout/accuracy" in m)
    return {"state": job.state, "wall_s": round(wall, 1), "scoring_s": round(scoring, 1), "checks": checks,
            "steps": job.events[-1].get("step"), "error": job.error}


def main() -> None:
    import yaml

    from experiments.robust import DEFAULT_DATA, prepare
    from studio.config.run import RunConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--eval-rows", type=int, default=150, help="held-out rows (the default split of 3000 rows: 150)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    work = Path(a.work)
    prepare(work, a.data, a.eval_rows, 0, a.limit)
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = {"train.seed": a.seed, "data.train_file": str(work / "split" / "train.jsonl"), "train.save_steps": 100_000,
            **sets}
    out = {}
    for name, extra in (("no_watch", {"data.eval_file": None, "data.eval_fraction": 0.0}),
                        ("watch", {"data.eval_file": str(work / "split" / "heldout.jsonl"),
                                   "data.eval_max_rows": a.eval_rows})):
        cfg = RunConfig().updated({**base, **extra, "name": name, "output_dir": str(work / "runs" / name)})
        out[name] = one(cfg)
        print(json.dumps({name: out[name]}), flush=True)
    ratio = out["watch"]["wall_s"] / out["no_watch"]["wall_s"]
    print("RESULT " + json.dumps({**out, "overhead": round(ratio - 1, 4),
                                  "scoring_share": round(out["watch"]["scoring_s"] / out["watch"]["wall_s"], 4)}))


if __name__ == "__main__":
    main()
