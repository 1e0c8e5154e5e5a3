"""The studio's own engine on a GPU: one configuration per process, one JSON line of figures.

    python bench/engine_gpu.py --arch qwen2.5-3b --backend unsloth --seq 1024 --bs 2 --cap-gib 7.5

Random weights of the real architecture (bench/random_models.py), the allocator capped to stand in for a desktop
card. Prints RESULT {...}: ok, losses finite, step time median, train tokens/s (prompt+completion tokens), peak GiB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--backend", choices=["unsloth", "bnb", "full"], required=True)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cap-gib", type=float, default=7.5)
    ap.add_argument("--set", action="append", default=[], help="extra run-config overrides FIELD=VALUE")
    a = ap.parse_args()

    if a.backend == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers)
    import torch
    import yaml

    from bench.random_models import make_model_dir, write_dataset
    from studio.config import RunConfig
    from studio.engine import Engine

    result = dict(arch=a.arch, backend=a.backend, seq=a.seq, bs=a.bs, rank=a.rank, cap_gib=a.cap_gib, sets=a.set)
    cuda = torch.cuda.is_available()  # a CPU dry run (tiny-llama, --backend full) checks the script itself
    model_dir = make_model_dir(a.arch, device="cuda" if cuda else "cpu")
    if cuda and a.cap_gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    half = a.seq // 2 - 2
    n = a.bs * a.grad_accum * (a.steps + a.warmup + 2)
    data = write_dataset(f"/tmp/bench_{a.seq}.jsonl", n, half, half)
    changes = {
        "name": f"bench-{a.arch}-{a.backend}", "output_dir": f"/tmp/bench_runs/{a.arch}-{a.backend}-{a.seq}",
        "model.name_or_path": model_dir, "model.backend": a.backend,
        "lora.r": a.rank, "lora.lora_alpha": a.rank,
        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "kto.max_length": a.seq, "train.per_device_train_batch_size": a.bs,
        "train.gradient_accumulation_steps": a.grad_accum, "train.max_steps": a.steps + a.warmup,
        "train.save_steps": 10_000, "train.learning_rate": 2e-4, "train.gradient_checkpointing": True,
        "data.train_file": data, "data.shuffle": False,
    }
    for s in a.set:
        k, v = s.split("=", 1)
        changes[k] = yaml.safe_load(v)
    cfg = RunConfig().updated(changes)
    engine = Engine()
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    result["wall_s"] = round(time.time() - t0, 1)
    result["state"] = job.state
    result["backend_used"] = job.backend
    if job.error:
        result["error"] = job.error[:300]
    metrics = [m for m in job.metrics() if "loss" in m]
    # per-step wall times from the elapsed clock of consecutive logs
    el = [m["elapsed_s"] for m in metrics]
    steps = [b - a_ for a_, b in zip(el, el[1:])][a.warmup - 1:]
    if steps:
        med = statistics.median(steps)
        result["step_s_median"] = round(med, 3)
        result["train_tok_per_s"] = round(a.bs * a.grad_accum * 2 * half / med, 1)
    losses = [m["loss"] for m in metrics]
    result["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    result["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    if cuda:
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    result["ok"] = job.state == "finished" and result["losses_finite"]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
