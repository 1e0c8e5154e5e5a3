"""Seconds a CPU training step takes with the bundled model, to calibrate ``studio.training.duration``.

    python bench/cpu_duration.py [--data FILE] [--max-length N] [--batch B] [--steps S]

Trains a few steps through the engine (the UI's and CLI's path) and prints, per step, the rows, the padded tokens
and the seconds, then the fitted constant (seconds per token per billion parameters) that studio/training/duration.py uses.
Other work on the machine slows it down: say so with the figure.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("KTO_STUDIO_HOME", tempfile.mkdtemp(prefix="kto-bench-"))
    from studio.training import duration
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    cfg = RunConfig().updated({
        "name": "bench", "data.train_file": a.data, "kto.max_length": a.max_length,
        "train.per_device_train_batch_size": a.batch, "train.gradient_accumulation_steps": a.accum,
        "train.max_steps": a.steps, "train.gradient_checkpointing": a.checkpointing, "train.save_steps": 10_000,
        "kto.precompute_ref_log_probs": False, "data.evaluate_after": False,
        # no held-out rows: the held-out watch's scoring passes would otherwise be timed as training steps
        "data.eval_fraction": 0.0, "watch.every_steps": 0})
    t0 = time.time()
    engine = Engine()
    job = engine.start(cfg)
    engine.wait()
    assert job.state == "finished", job.error
    steps = job.metrics()
    first = next(e for e in job.events if e["type"] == "progress")
    per_step = (steps[-1]["time"] - first["time"]) / len(steps)
    est = duration.estimate(cfg, lengths=duration.data_lengths(cfg))
    params = duration.model_params(cfg)
    tokens = est.tokens_per_step
    print(f"steps {len(steps)} · rows/step {a.batch * a.accum} · tokens/step ~{tokens:.0f} · measured {per_step:.1f} "
          f"s/step · estimated {est.step_s:.1f} s/step · whole job {time.time() - t0:.0f} s · cores {os.cpu_count()}")
    print(f"fitted SECONDS_PER_TOKEN_GPARAM = {per_step / (tokens * params / 1e9):.4f}")


if __name__ == "__main__":
    main()
