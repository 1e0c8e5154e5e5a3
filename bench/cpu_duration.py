"""Seconds a CPU training step takes with the bundled model, to calibrate ``studio.training.duration``.

    python bench/cpu_duration.py [--data FILE] [--max-length N] [--batch B] [--steps S] [--float32]

Trains a few steps through the engine (the UI's and CLI's path) and prints, per step, the rows, the padded tokens
and the seconds, then the fitted constant (seconds per token per billion parameters) that studio/training/duration.py uses:
SECONDS_PER_TOKEN_GPARAM_BF16 on a CPU with native bf16 (model.dtype 'auto' trains in bf16 autocast there),
SECONDS_PER_TOKEN_GPARAM with ``--float32`` or on a CPU without it (given the per-pass constant; run it on short and
long rows to fit both). The load average is printed with the figure:
other work on the machine slows it down (a quiet machine's load average stays under 0.5).
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
    ap.add_argument("--float32", action="store_true", help="float32 math, as on a CPU without native bf16")
    a = ap.parse_args()
    if a.float32:
        os.environ["KTO_STUDIO_CPU_BF16"] = "0"
    os.environ.setdefault("KTO_STUDIO_HOME", tempfile.mkdtemp(prefix="kto-bench-"))
    from studio.training import duration
    from studio.config.run import RunConfig
    from studio.training.engine import Engine
    from studio.models.load import detect_device

    cfg = RunConfig().updated({
        "name": "bench", "data.train_file": a.data, "kto.max_length": a.max_length,
        "train.per_device_train_batch_size": a.batch, "train.gradient_accumulation_steps": a.accum,
        "train.max_steps": a.steps, "train.gradient_checkpointing": a.checkpointing, "train.save_steps": 10_000,
        "kto.precompute_ref_log_probs": False, "data.evaluate_after": False,
        # no held-out rows: the held-out watch's scoring passes would otherwise be timed as training steps
        "data.eval_fraction": 0.0, "watch.every_steps": 0, **({"model.dtype": "float32"} if a.float32 else {})})
    device = detect_device()
    load0 = os.getloadavg()[0]
    t0 = time.time()
    engine = Engine()
    job = engine.start(cfg)
    engine.wait()
    assert job.state == "finished", job.error
    steps = job.metrics()
    first = next(e for e in job.events if e["type"] == "progress")
    per_step = (steps[-1]["time"] - first["time"]) / len(steps)
    est = duration.estimate(cfg, lengths=duration.data_lengths(cfg), device=device)
    params = duration.model_params(cfg)
    tokens = est.tokens_per_step
    print(f"steps {len(steps)} · rows/step {a.batch * a.accum} · tokens/step ~{tokens:.0f} · measured {per_step:.1f} "
          f"s/step · estimated {est.step_s:.1f} s/step · whole job {time.time() - t0:.0f} s · cores {os.cpu_count()} · "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end")
    bf16 = duration.seconds_per_token_gparam(cfg, device) == duration.SECONDS_PER_TOKEN_GPARAM_BF16
    name = "SECONDS_PER_TOKEN_GPARAM_BF16 (bf16 autocast)" if bf16 else "SECONDS_PER_TOKEN_GPARAM (float32 math)"
    per_pass = duration.seconds_per_pass_gparam(cfg, device) * a.accum * params / 1e9
    print(f"fitted {name} = {(per_step - per_pass) / (tokens * params / 1e9):.4f} with "
          f"{duration.seconds_per_pass_gparam(cfg, device)} s per pass-Gparam ({per_pass:.1f} s a step); "
          f"{per_step / (tokens * params / 1e9):.4f} as the only constant (two runs of different row lengths fit both)")


if __name__ == "__main__":
    main()
