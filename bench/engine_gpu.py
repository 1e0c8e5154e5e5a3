"""The studio's own engine on a GPU: one configuration per process, one JSON line of figures.

    python bench/engine_gpu.py --arch qwen2.5-3b --backend unsloth --seq 1024 --bs 2 --cap-gib 7.5

Random weights of the real architecture (bench/random_models.py), the allocator capped to stand in for a desktop
card. Prints RESULT {...}: ok, losses finite, step time median, train tokens/s (prompt+completion tokens), peak GiB.

Steps are timed exactly as ../shared/bench/anchor_kto.py times them (a callback synchronizing the GPU at each step's
begin and end; the median after the warm-up steps): ``step_s_median`` and ``train_tok_per_s``. ``step_s_logged`` is
the older, stricter clock (between consecutive logs: it also counts logging and loading the next batch). With
``--one-epoch`` the data is exactly the rows the run trains on, so ``kto.precompute_ref_log_probs: auto`` turns on as
it would for a real run; the time of that pass before training (``precompute_s``) is then charged to the steps in
``tok_per_s_with_precompute`` (tokens / (median step + precompute_s / steps)), the figure to compare.
``peak_before_train_gib`` is the peak up to the first step (loading and the precompute pass), ``peak_train_gib`` the
peak of the steps alone.
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
    ap.add_argument("--one-epoch", action="store_true", help="data = exactly the rows trained (no spare batches)")
    ap.add_argument("--epochs", type=int, default=1,
                    help="with --one-epoch: the same steps over 1/EPOCHS of the rows, EPOCHS times (the precompute "
                         "pass then serves EPOCHS steps per row)")
    ap.add_argument("--set", action="append", default=[], help="extra run-config overrides FIELD=VALUE")
    a = ap.parse_args()

    if a.backend == "unsloth":
        from bench.random_models import ARCHS
        from studio.models import load as models

        # as the engine does before Unsloth's first import (Gemma needs its compiler off)
        models.unsloth_compile_switch(ARCHS.get(a.arch, {}).get("model_type"), False)
        import unsloth  # noqa: F401  (must be imported before transformers)
    import torch
    import yaml

    from bench.random_models import make_model_dir, write_dataset
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    result = dict(arch=a.arch, backend=a.backend, seq=a.seq, bs=a.bs, rank=a.rank, cap_gib=a.cap_gib, sets=a.set,
                  epochs=a.epochs)
    cuda = torch.cuda.is_available()  # a CPU dry run (tiny-llama, --backend full) checks the script itself
    model_dir = make_model_dir(a.arch, device="cuda" if cuda else "cpu")
    if cuda and a.cap_gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    half = a.seq // 2 - 2
    n = a.bs * a.grad_accum * (a.steps + a.warmup + (0 if a.one_epoch else 2))
    if a.one_epoch and a.epochs > 1:
        if (a.steps + a.warmup) % a.epochs:
            raise SystemExit("--epochs must divide --steps + --warmup")
        n //= a.epochs
    data = write_dataset(f"/tmp/bench_{a.seq}.jsonl", n, half, half)
    changes = {
        "name": f"bench-{a.arch}-{a.backend}", "output_dir": f"/tmp/bench_runs/{a.arch}-{a.backend}-{a.seq}",
        "model.name_or_path": model_dir, "model.backend": a.backend,
        "lora.r": a.rank, "lora.lora_alpha": a.rank,
        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "kto.max_length": a.seq, "train.per_device_train_batch_size": a.bs,
        "train.gradient_accumulation_steps": a.grad_accum, "train.max_steps": a.steps + a.warmup,
        "train.save_steps": 10_000, "train.learning_rate": 2e-4, "train.gradient_checkpointing": True,
        "data.train_file": data, "data.shuffle": False, "train.num_train_epochs": float(a.epochs),
    }
    for s in a.set:
        k, v = s.split("=", 1)
        changes[k] = yaml.safe_load(v)
    cfg = RunConfig().updated(changes)
    engine = Engine()
    clock = _step_clock(cuda)
    engine.extra_callbacks.append(clock)
    ref_pass_s = _time_reference_passes(cuda)
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
    tokens_per_step = a.bs * a.grad_accum * 2 * half
    if steps:
        result["step_s_logged"] = round(statistics.median(steps), 3)
    timed = clock.step_s[a.warmup:]
    if timed:
        med = statistics.median(timed)
        result["step_s_median"] = round(med, 3)
        result["train_tok_per_s"] = round(tokens_per_step / med, 1)
        if clock.precompute_s is not None and clock.precomputed:
            result["precompute_s"] = round(clock.precompute_s, 2)
            per_step = clock.precompute_s / max(1, len(clock.step_s))  # (its rows serve --epochs steps each)
            result["tok_per_s_with_precompute"] = round(tokens_per_step / (med + per_step), 1)
            if len(ref_pass_s) > 1:  # a long epoch's rate: the steady per-row cost of the pass, 2 rows' worth a step
                rows_per_pass = clock.ref_rows  # what the engine passed to TRL ('auto' resolved)
                result["precompute_rows_per_pass"] = rows_per_pass
                result["precompute_pass_s_median"] = round(statistics.median(ref_pass_s[1:]), 4)
                steady = statistics.median(ref_pass_s[1:]) * a.bs * a.grad_accum / rows_per_pass / a.epochs
                result["tok_per_s_with_precompute_steady"] = round(tokens_per_step / (med + steady), 1)
    losses = [m["loss"] for m in metrics]
    result["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    result["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    result["precomputed_ref"] = bool(clock.precomputed)
    if cuda:
        result["peak_before_train_gib"] = clock.peak_before_train_gib
        result["peak_train_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_alloc_gib"] = max(result["peak_train_gib"], clock.peak_before_train_gib or 0)
        result["peak_reserved_gib"] = max(round(torch.cuda.max_memory_reserved() / 2**30, 2),
                                          clock.reserved_before_train_gib or 0)
    result["ok"] = job.state == "finished" and result["losses_finite"]
    print("RESULT " + json.dumps(result), flush=True)


def _time_reference_passes(cuda: bool) -> list[float]:
    """Times each call of TRL's KTOTrainer.compute_ref_log_probs (one precompute batch) into the returned list."""
    from trl import KTOTrainer

    times: list[float] = []
    original = KTOTrainer.compute_ref_log_probs

    def timed(self, model, inputs):
        _sync(cuda)
        t = time.perf_counter()
        out = original(self, model, inputs)
        _sync(cuda)
        times.append(time.perf_counter() - t)
        return out

    KTOTrainer.compute_ref_log_probs = timed
    return times


def _sync(cuda: bool) -> None:
    """Wait for the GPU, so that a host clock read next sees the work queued before it done."""
    if cuda:
        import torch

        torch.cuda.synchronize()


def _step_clock(cuda: bool):
    """A TrainerCallback: the anchor's step timer, plus the precompute pass (between the trainer's init and the first
    step, with the rows per pass TRL was given) and the peak memory before the steps (then reset, so that the steps'
    own peak is read at the end)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self.precompute_s = self.t_init = self.t = None
            self.precomputed, self.ref_rows = False, None
            self.peak_before_train_gib = self.reserved_before_train_gib = None

        def on_init_end(self, args, state, control, **kw):
            _sync(cuda)
            self.t_init = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            _sync(cuda)
            if self.t_init is not None:
                self.precompute_s = time.perf_counter() - self.t_init
            self.precomputed, self.ref_rows = args.precompute_ref_log_probs, args.precompute_ref_batch_size
            if cuda:
                import torch

                self.peak_before_train_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                self.reserved_before_train_gib = round(torch.cuda.max_memory_reserved() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            _sync(cuda)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(cuda)
            self.step_s.append(time.perf_counter() - self.t)

    return StepClock()


if __name__ == "__main__":
    main()
