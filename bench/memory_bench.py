"""Peak GPU memory of the studio's own KTO training, measured, beside the estimate of studio/training/memory.py.

Models of the presets' real architectures (presets/models/*.yaml) with random weights - memory does not depend on
weight values and no hub is reachable on the GPU machine - are loaded by `studio.models.load.load_for_training` and trained
by `studio.training.engine.Engine`, exactly as the studio does, under an allocator cap that stands in for a desktop card.

    python bench/memory_bench.py run --model mistral-7b-instruct-v0.3 --path unsloth --seq 2048 --batch 2
    python bench/memory_bench.py run --model qwen2.5-7b-instruct --path bnb --autofit       # auto-fit, then train
    python bench/memory_bench.py sweep --plan autofit --out results.jsonl                  # one process per config
    python bench/memory_bench.py merge results.jsonl        # measured points -> tests/fixtures/memory_points.json
    python bench/memory_bench.py fit                        # recalibrate the estimate's three constants
    python bench/memory_bench.py table [results.jsonl]      # estimate vs measured, markdown
    python bench/memory_bench.py bnbfit --out results.jsonl  # issue 27: the 7-8B presets on bitsandbytes, 7.5 GiB
    python bench/memory_bench.py bnbfit --tiny --cpu --seq 256   # the same script end to end on a CPU, tiny models

`run` prints one line `RESULT {json}`: ok / oom, the setup peak (loading + trainer set-up), the training peak, the
overall peak allocated and reserved GiB, and the estimate for the same settings and cap. One configuration per
process: Unsloth patches libraries globally. On the device image: `source .whl/device_setup.sh` first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "memory_points.json"
TIERS = ("3B", "7B", "8B")


# ---- models and data ---------------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4100, max_position_embeddings=4096)


def model_spec(model: str, tiny: bool = False) -> dict:
    """The preset's architecture (presets/models/MODEL.yaml), or with ``tiny`` a two-layer model of the same type
    (the CPU dry run of this script)."""
    from studio.config import presets

    spec = dict(presets.get("models", model).get("config"))
    if tiny:
        spec = dict(TINY, model_type=spec["model_type"], tie_word_embeddings=spec.get("tie_word_embeddings", False))
    return spec


def make_model_dir(model: str, root: str, tiny: bool = False) -> str:
    """A checkpoint of the preset's architecture with random bf16 weights and the bench tokenizer
    (bench/random_models.py), built on the GPU when there is one."""
    import torch

    from bench.random_models import make_model_dir as build

    return build(model + ("-tiny" if tiny else ""), root=root, device="cuda" if torch.cuda.is_available() else "cpu",
                 spec=model_spec(model, tiny))


def write_rows(path: str, n: int, seq: int, seed: int = 0) -> str:
    """KTO rows of seq tokens: half prompt, half completion (TRL adds one EOS), 60% desirable."""
    from bench.random_models import write_dataset

    half = seq // 2 - 2
    return write_dataset(path, n, half, half, seed=seed, desirable=0.6)


def allow_bnb_on_cpu() -> None:
    """The CPU dry run (--cpu): let the bitsandbytes path load on a CPU, in this process only. The studio refuses it
    there (``choose_backend``: a user's run needs CUDA); bitsandbytes' CPU backend runs NF4, which is enough to check
    this script end to end before the one GPU call. bitsandbytes' CPU-only inference format is kept off: on a CPU
    with AVX-512 BF16 it repacks a layer's weights at the first no-gradient pass (the reference or held-out scoring),
    after which the layer runs an inference kernel in training too (in-place bias add: qwen2 fails)."""
    import bitsandbytes.nn.modules as bnb_modules

    from studio.models import load as models

    bnb_modules.has_avx512bf16 = lambda: False

    chosen = models.choose_backend

    def choose(cfg, device):
        return "bnb" if cfg.model.backend == "bnb" else chosen(cfg, device)

    models.choose_backend = choose


# ---- one configuration -------------------------------------------------------------------------------------------

def cmd_run(a) -> int:
    if a.path == "unsloth":
        from studio.models import load as models
        from studio.config import presets

        # as the engine does before Unsloth's first import (Gemma needs its compiler off)
        models.unsloth_compile_switch(presets.get("models", a.model).get("config", {}).get("model_type"), False)
        import unsloth  # noqa: F401  (before transformers, as the studio's unsloth path needs)
    import torch

    from studio.models.arch import dtype_bytes
    from studio.training import autofit, memory
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    if a.cpu:
        allow_bnb_on_cpu()
    arch = memory.Arch.from_config(model_spec(a.model, a.tiny), name=a.model + ("-tiny" if a.tiny else ""))
    result = dict(model=a.model, path=a.path, seq=a.seq, batch=a.batch, rank=a.rank, cap_gib=a.cap_gib,
                  precompute_ref=a.precompute_ref, steps=a.steps, runner="studio-engine", tiny=a.tiny,
                  reference_copy=False)  # the engine drops TRL's copy of a fresh adapter
    cuda = torch.cuda.is_available()
    if cuda:
        result["card"] = torch.cuda.get_device_name(0)
    settings = memory.Settings(seq=a.seq, batch=a.batch, rank=a.rank, micro_batch=a.micro_batch)
    accum = a.grad_accum
    if a.autofit:  # as `python -m studio fit` (--fixed-seq: as `fit --seq N`)
        fit = autofit.auto_fit(arch, a.path, a.cap_gib, seq=a.seq if a.fixed_seq else None,
                              seq_ceiling=a.seq_ceiling, effective_batch=a.effective_batch, settings=settings)
        result["autofit"] = fit.as_dict()
        if not fit.ok:
            result.update(ok=False, refused=True, error=fit.reason)
            print("RESULT " + json.dumps(result), flush=True)
            return 0
        settings.seq, settings.batch = fit.seq, fit.batch
        settings.micro_batch = fit.micro_batch
        accum = fit.grad_accum if a.grad_accum is None else a.grad_accum
        result.update(seq=fit.seq, batch=fit.batch)
    result.update(micro_batch=settings.micro_batch)
    accum = accum or 1
    result["grad_accum"] = accum
    est = memory.estimate(arch, a.path, settings, budget_gib=a.cap_gib if a.cap_gib > 0 else None)
    result["estimate_gib"] = round(est.total_gib, 3)
    result["estimate"] = {k: round(v, 3) for k, v in est.components.items()}

    model_dir = make_model_dir(a.model, a.models_dir, a.tiny)
    if cuda and a.cap_gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tag = f"{a.model}-{a.path}-{settings.seq}" + ("-tiny" if a.tiny else "")
    data = write_rows(f"/tmp/memory_bench_{tag}.jsonl", settings.batch * accum * (a.steps + 2), settings.seq)
    names = [n for n, _, _ in arch.linears()]
    cfg = RunConfig().updated({
        "name": "memory-bench", "output_dir": f"/tmp/memory_bench_runs/{tag}",
        "model.name_or_path": model_dir, "model.backend": a.path, "model.load_in_4bit": a.path != "full",
        # the CPU dry run in the GPU's dtype (a CPU's plan keeps float32 weights)
        **({"model.dtype": "bfloat16"} if a.cpu and not cuda else {}),
        # the run plan checks and plans against the card's budget, not the GPU the cap stands in front of
        "model.gpu_memory_gib": a.cap_gib if cuda and a.cap_gib > 0 else None,
        "lora.r": a.rank, "lora.lora_alpha": a.rank, "lora.target_modules": names,
        "kto.max_length": settings.seq, "kto.precompute_ref_log_probs": a.precompute_ref,
        "train.per_device_train_batch_size": settings.batch, "train.gradient_accumulation_steps": accum,
        "train.max_steps": a.steps, "train.save_steps": 100_000, "train.learning_rate": 2e-4,
        "train.warmup_steps": 0.0, "train.gradient_checkpointing": True,
        "data.train_file": data, "data.shuffle": False,
        "memory.micro_batch_size": settings.micro_batch,
    })
    phases: dict = {}

    def on_event(job, event):
        # Training starts after this status: what came before is loading and trainer set-up
        if cuda and event["type"] == "status" and str(event.get("message", "")).startswith(("Training", "Resuming")):
            phases["setup_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            phases["after_setup_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()

    engine = Engine(on_event=on_event)
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    result["wall_s"] = round(time.time() - t0, 1)
    result["backend_used"] = job.backend
    result.update(phases)
    if job.plan is not None:  # what the studio itself predicted and decided for this run
        result["planned_peak_gib"] = job.plan.peak_gib
        result["frozen_dtype"] = job.plan.frozen_dtype
        result["frozen_bytes"] = dtype_bytes(job.plan.frozen_dtype)
        result["precompute_rows"] = job.plan.precompute_rows if job.plan.precompute_ref else None
    metrics = [m for m in job.metrics() if "loss" in m]
    result["steps_done"] = metrics[-1]["step"] if metrics else 0
    result["losses_finite"] = bool(metrics) and all(math.isfinite(m["loss"]) for m in metrics)
    if cuda:
        train_peak = torch.cuda.max_memory_allocated() / 2**30
        result["train_peak_gib"] = round(train_peak, 3) if "setup_peak_gib" in phases else None
        result["peak_alloc_gib"] = round(max(train_peak, phases.get("setup_peak_gib", 0.0)), 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    result["ok"] = job.state == "finished" and result["steps_done"] >= a.steps and result["losses_finite"]
    if job.error:
        result["error"] = job.error[:400]
        result["oom"] = "out of memory" in job.error.lower()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- issue 27: the bitsandbytes path on an 8 GB card -------------------------------------------------------------

BNBFIT_MODELS = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3", "gemma-7b-it")
WITHIN = 0.10  # the measured peak against the prediction


def cmd_bnbfit(a) -> int:
    """Each model's bitsandbytes run as `python -m studio fit --model M --gpu-gib CAP --seq SEQ` plans it (auto-fit's
    batch and memory savers at that length, reference log-probs precomputed as a one-epoch run does), trained by the
    engine under the allocator cap, one process per model, ``--parallel`` models at a time (each builds its random
    checkpoint, runs, deletes it: at most that many 15-17 GB checkpoints on disk). A deadline keeps the whole call
    inside one device command; unfinished models are reported as such. Prints one RESULT line per model and a table:
    the run plan's predicted peak against the measured peak (loading, precompute and training), which must be within
    10% and under the cap."""
    import concurrent.futures as futures

    models = a.models.split(",") if a.models else list(BNBFIT_MODELS)
    deadline = time.time() + a.deadline
    out = open(a.out, "a") if a.out else None
    results: dict[str, dict] = {}

    def one(model: str) -> dict:
        left = deadline - time.time()
        if left < 30:
            return {"model": model, "ok": False, "error": "not started: the deadline was near"}
        cmd = [sys.executable, __file__, "run", "--model", model, "--path", "bnb", "--autofit", "--fixed-seq",
               "--seq", str(a.seq), "--precompute-ref", "--cap-gib", str(a.cap_gib), "--steps", str(a.steps),
               "--grad-accum", "1", "--models-dir", a.models_dir] + (["--tiny"] if a.tiny else []) + (
               ["--cpu"] if a.cpu else [])
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {
                "model": model, "ok": False, "error": f"no result (rc {proc.returncode})",
                "stderr_tail": (proc.stderr or "")[-800:]}
        except subprocess.TimeoutExpired:
            r = {"model": model, "ok": False, "error": f"stopped at the deadline after {time.time() - t0:.0f} s"}
        finally:
            shutil.rmtree(os.path.join(a.models_dir, model + ("-tiny" if a.tiny else "")), ignore_errors=True)
        r["process_s"] = round(time.time() - t0, 1)
        return r

    with futures.ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        for r in pool.map(one, models):
            results[r["model"]] = r
            line = "RESULT " + json.dumps(r)
            print(line, flush=True)
            if out:
                out.write(line.removeprefix("RESULT ") + "\n")
                out.flush()
    print(bnbfit_table([results[m] for m in models], a.cap_gib))
    return 0


def bnbfit_verdict(r: dict, cap_gib: float) -> tuple[float | None, str]:
    """(relative error of the prediction, verdict) for one model's result."""
    measured, predicted = r.get("peak_alloc_gib"), r.get("planned_peak_gib") or r.get("estimate_gib")
    if not r.get("ok"):
        return None, "FAILED: " + str(r.get("error", "see the RESULT line"))[:160]
    if measured is None:  # the CPU dry run: nothing to measure
        return None, "ran (no GPU: nothing measured)"
    err = (measured - predicted) / predicted
    good = measured <= predicted * (1 + WITHIN) and abs(err) <= WITHIN and measured < cap_gib
    return err, "ok" if good else (f"OFF: measured {measured:.2f} vs predicted {predicted:.2f} GiB"
                                   + (f", over the {cap_gib:g} GiB cap" if measured >= cap_gib else ""))


def bnbfit_table(rows: list[dict], cap_gib: float) -> str:
    lines = [f"| model | rows x tokens (gradients) | frozen dtype | predicted GiB | measured GiB (setup / steps) | "
             f"error | verdict (within {WITHIN:.0%}, under {cap_gib:g} GiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        err, verdict = bnbfit_verdict(r, cap_gib)
        shape = f"{r.get('batch', '?')} x {r.get('seq', '?')}" + (
            f" ({r['micro_batch']} row at a time)" if r.get("micro_batch") else "")
        predicted = r.get("planned_peak_gib") or r.get("estimate_gib")
        measured = "–" if r.get("peak_alloc_gib") is None else (
            f"{r['peak_alloc_gib']:.2f} ({r.get('setup_peak_gib') or 0:.2f} / {r.get('train_peak_gib') or 0:.2f})")
        lines.append(f"| {r['model']} | {shape} | {r.get('frozen_dtype', '?')} | "
                     f"{'–' if predicted is None else format(predicted, '.2f')} | {measured} | "
                     f"{'–' if err is None else format(err, '+.1%')} | {verdict} |")
    return "\n".join(lines)


# ---- plans -------------------------------------------------------------------------------------------------------

def plan(name: str, models: list[str] | None) -> list[list[str]]:
    """Argument lists for `run`, ordered by model so each random checkpoint is built once."""
    from studio.config import presets

    tiered = [p.key for p in presets.list_presets("models") if p.get("tier") in TIERS]
    runs: list[tuple[str, list[str]]] = []
    if name in ("autofit", "all"):  # the acceptance check: auto-fit under 7.5 GiB, then 10 steps
        # with the reference log-probs precomputed, as a real one-epoch run does (kto.precompute_ref_log_probs 'auto')
        runs += [(m, ["--model", m, "--path", p, "--autofit", "--precompute-ref"]) for m in tiered
                 for p in ("unsloth", "bnb")]
    if name in ("anchors", "all"):  # GPU.md's anchor settings through the studio's own engine
        for m, p, seq, bs in [("qwen2.5-3b-instruct", "bnb", 1024, 2), ("qwen2.5-3b-instruct", "bnb", 2048, 2),
                              ("qwen2.5-3b-instruct", "unsloth", 1024, 2), ("qwen2.5-3b-instruct", "unsloth", 2048, 2),
                              ("qwen2.5-3b-instruct", "unsloth", 1024, 4), ("llama-3.2-3b-instruct", "bnb", 1024, 2),
                              ("llama-3.2-3b-instruct", "unsloth", 1024, 2),
                              ("mistral-7b-instruct-v0.3", "bnb", 1024, 2),
                              ("mistral-7b-instruct-v0.3", "unsloth", 1024, 2),
                              ("mistral-7b-instruct-v0.3", "unsloth", 4096, 2),
                              ("llama-3.1-8b-instruct", "unsloth", 1024, 2),
                              ("llama-3.1-8b-instruct", "unsloth", 2048, 2)]:
            runs.append((m, ["--model", m, "--path", p, "--seq", str(seq), "--batch", str(bs)]))
    if name in ("calibrate", "all"):  # what the anchors lack: other models, short/long rows, batch 4, rank 64
        for m in tiered:
            for p in ("unsloth", "bnb"):
                runs.append((m, ["--model", m, "--path", p, "--seq", "512", "--batch", "2"]))
                runs.append((m, ["--model", m, "--path", p, "--seq", "1024", "--batch", "4"]))
            runs.append((m, ["--model", m, "--path", "unsloth", "--seq", "2048", "--batch", "2", "--rank", "64"]))
    if models:
        runs = [r for r in runs if r[0] in models]
    runs.sort(key=lambda r: tiered.index(r[0]) if r[0] in tiered else 99)
    return [args for _, args in runs]


def cmd_sweep(a) -> int:
    models = a.models.split(",") if a.models else None
    todo = plan(a.plan, models)
    if a.paths:
        todo = [args for args in todo if args[args.index("--path") + 1] in a.paths.split(",")]
    out = open(a.out, "a") if a.out else None
    last_model = None
    for i, args in enumerate(todo, 1):
        model = args[1]
        if a.cleanup and last_model and model != last_model:
            shutil.rmtree(os.path.join(a.models_dir, last_model), ignore_errors=True)  # disk: 7B checkpoints ~15 GB
        last_model = model
        cmd = [sys.executable, __file__, "run", *args, "--cap-gib", str(a.cap_gib), "--steps", str(a.steps),
               "--models-dir", a.models_dir]
        if a.grad_accum:
            cmd += ["--grad-accum", str(a.grad_accum)]
        print(f"[{i}/{len(todo)}] {' '.join(args)}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                tail = (proc.stderr or "")[-600:]
                lines = ["RESULT " + json.dumps({"args": args, "ok": False, "error": f"no result (rc {proc.returncode})",
                                                 "stderr_tail": tail})]
        except subprocess.TimeoutExpired:
            lines = ["RESULT " + json.dumps({"args": args, "ok": False, "error": f"timeout after {a.timeout}s"})]
        for ln in lines:
            print(ln, flush=True)
            if out:
                out.write(ln.removeprefix("RESULT ") + "\n")
                out.flush()
    if a.cleanup and last_model:
        shutil.rmtree(os.path.join(a.models_dir, last_model), ignore_errors=True)
    return 0


# ---- fixtures, calibration, tables -------------------------------------------------------------------------------

def _read_results(path: str) -> list[dict]:
    rows = []
    for ln in Path(path).read_text().splitlines():
        ln = ln.strip().removeprefix("RESULT ")
        if ln.startswith("{"):
            rows.append(json.loads(ln))
    return rows


def _key(p: dict) -> tuple:
    return (p["model"], p["path"], p["seq"], p["batch"], p.get("rank", 16), bool(p.get("precompute_ref")),
            p.get("cap_gib", 7.5), p.get("micro_batch"), p.get("frozen_bytes"))


def cmd_merge(a) -> int:
    """Add measured runs to the fixture table: finished runs as 'measured', OOM runs as 'lower_bound' (the peak they
    reached before failing). A new measurement replaces an older point with the same settings (and its dispute)."""
    doc = json.loads(FIXTURE.read_text())
    points = {_key(p): p for p in doc["points"]}
    added = 0
    for r in _read_results(a.results):
        if r.get("refused") or r.get("tiny") or "peak_alloc_gib" not in r or "model" not in r:
            continue
        if not r.get("ok") and not r.get("oom"):
            continue  # failed for another reason: nothing learned about memory
        p = {"model": r["model"], "path": r["path"], "seq": r["seq"], "batch": r["batch"], "rank": r["rank"],
             "targets": "all-linear", "optim": "adamw_8bit", "gradient_checkpointing": True,
             "cap_gib": r["cap_gib"], "precompute_ref": r.get("precompute_ref", False), "lora_dropout": 0.0,
             "micro_batch": r.get("micro_batch"), "reference_copy": r.get("reference_copy", False),
             "peak_alloc_gib": r["peak_alloc_gib"], "kind": "measured" if r.get("ok") else "lower_bound",
             "source": f"bench/memory_bench.py ({r.get('runner')}, {r.get('card', 'GPU')})"}
        if r.get("frozen_bytes") and r["frozen_bytes"] != 2:  # the 16-bit default needs no mark
            p["frozen_bytes"] = r["frozen_bytes"]
        for k in ("setup_peak_gib", "train_peak_gib", "peak_reserved_gib"):
            if r.get(k) is not None:
                p[k] = r[k]
        points[_key(p)] = p
        added += 1
    doc["points"] = sorted(points.values(), key=lambda p: (p["path"], p["model"], p["seq"], p["batch"]))
    FIXTURE.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{added} points merged into {FIXTURE} ({len(doc['points'])} in all)")
    return 0


def _fixture_points(include_disputed: bool = False) -> list[dict]:
    pts = json.loads(FIXTURE.read_text())["points"]
    return [p for p in pts if include_disputed or not p.get("disputed")]


def settings_of_point(p: dict):
    from studio.training import memory

    targets = p.get("targets", "all-linear")
    return memory.Settings(seq=p["seq"], batch=p["batch"], rank=p.get("rank", 16),
                           targets=targets if isinstance(targets, str) else tuple(targets),
                           optim=p.get("optim", "adamw_8bit"),
                           micro_batch=p.get("micro_batch"), reference_copy=bool(p.get("reference_copy")),
                           # 4: PEFT's float32 upcast (the bitsandbytes runs before issue 27)
                           frozen_bytes=p.get("frozen_bytes"))


def cmd_fit(a) -> int:
    """Minimax relative error over the fixture (disputed points left out) for the two working-set terms and the paths'
    overheads; lower bounds only ask estimate >= 85% of the bound. Prints the constants to put in studio/training/memory.py."""
    import dataclasses

    from scipy.optimize import linprog

    from studio.training import memory

    paths = sorted({p["path"] for p in _fixture_points()})
    rows_a, rows_b = [], []
    saved = dict(memory.PATHS), memory.WORKING_SET_BYTES, memory.WORKING_SET_INTERMEDIATE_BYTES
    try:
        memory.WORKING_SET_BYTES = memory.WORKING_SET_INTERMEDIATE_BYTES = 0.0
        for k in paths:
            memory.PATHS[k] = dataclasses.replace(memory.PATHS[k], overhead_gib=0.0)
        for p in _fixture_points():
            arch, s = memory.arch_for(p["model"]), settings_of_point(p)
            base = memory.estimate(arch, p["path"], s, budget_gib=p.get("cap_gib")).total_gib
            n_tok = s.seq * s.active_rows  # one micro-batch's activations
            slopes = [n_tok * arch.hidden / memory.GIB, n_tok * arch.intermediate / memory.GIB]
            onehot = [1.0 if p["path"] == k else 0.0 for k in paths]
            m = p["peak_alloc_gib"]
            if p["kind"] == "measured":  # |base + slopes.w + c - m| <= t*m
                rows_a += [[*slopes, *onehot, -m], [*[-x for x in slopes], *[-x for x in onehot], -m]]
                rows_b += [m - base, base - m]
            else:
                rows_a.append([*[-x for x in slopes], *[-x for x in onehot], 0.0])
                rows_b.append(base - 0.85 * m)
    finally:
        memory.PATHS.clear()
        memory.PATHS.update(saved[0])
        memory.WORKING_SET_BYTES, memory.WORKING_SET_INTERMEDIATE_BYTES = saved[1], saved[2]
    n = len(paths) + 3
    res = linprog([0.0] * (n - 1) + [1.0], A_ub=rows_a, b_ub=rows_b, bounds=[(0, None)] * n)
    if not res.success:
        print(f"no fit: {res.message}")
        return 1
    print(f"WORKING_SET_BYTES = {res.x[0]:.1f}")
    print(f"WORKING_SET_INTERMEDIATE_BYTES = {res.x[1]:.1f}")
    for k, c in zip(paths, res.x[2:-1]):
        print(f"PATHS['{k}'].overhead_gib = {c:.3f}")
    print(f"max relative error {res.x[-1]:.3f} over {len(_fixture_points())} points")
    return 0


def cmd_table(a) -> int:
    from studio.training import memory

    pts = _fixture_points(include_disputed=True) if not a.results else [
        {**r, "kind": "measured" if r.get("ok") else "lower_bound"} for r in _read_results(a.results)
        if "peak_alloc_gib" in r and "model" in r and (r.get("ok") or r.get("oom"))]
    print("| model | path | seq | batch | rank | measured GiB | estimate GiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for p in pts:
        e = memory.estimate(memory.arch_for(p["model"]), p["path"], settings_of_point(p), budget_gib=p.get("cap_gib"))
        m = p["peak_alloc_gib"]
        mark = ">= " if p["kind"] == "lower_bound" else ""
        flag = " (disputed)" if p.get("disputed") else ""
        print(f"| {p['model']} | {p['path']} | {p['seq']} | {p['batch']} | {p.get('rank', 16)} | {mark}{m:.2f} | "
              f"{e.total_gib:.2f} | {(e.total_gib - m) / m:+.1%}{flag} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one configuration in this process")
    r.add_argument("--model", required=True, help="a presets/models key, e.g. mistral-7b-instruct-v0.3")
    r.add_argument("--path", choices=["unsloth", "bnb", "full"], required=True)
    r.add_argument("--seq", type=int, default=1024)
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--grad-accum", type=int, default=None)
    r.add_argument("--rank", type=int, default=16)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--cap-gib", type=float, default=7.5)
    r.add_argument("--precompute-ref", action="store_true")
    r.add_argument("--micro-batch", type=int, default=None, help="memory.micro_batch_size (rows per policy pass)")
    r.add_argument("--autofit", action="store_true", help="let studio.autofit.auto_fit choose seq and batch")
    r.add_argument("--seq-ceiling", type=int, default=4096)
    r.add_argument("--fixed-seq", action="store_true", help="with --autofit: keep --seq, fit the batch (fit --seq)")
    r.add_argument("--effective-batch", type=int, default=16)
    r.add_argument("--models-dir", default="/tmp/models")
    r.add_argument("--tiny", action="store_true", help="a two-layer model of the preset's type (CPU dry run)")
    r.add_argument("--cpu", action="store_true", help="let the bitsandbytes path run on a CPU (dry run of this script)")
    r.set_defaults(func=cmd_run)
    b = sub.add_parser("bnbfit", help="issue 27: the bitsandbytes path of the 7-8B presets under an 8 GB card's cap")
    b.add_argument("--models", default=None, help=f"comma-separated preset keys (default: {','.join(BNBFIT_MODELS)})")
    b.add_argument("--seq", type=int, default=1024)
    b.add_argument("--cap-gib", type=float, default=7.5)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--parallel", type=int, default=2, help="models at a time (disk: one 15-17 GB checkpoint each)")
    b.add_argument("--deadline", type=float, default=540, help="seconds for the whole command")
    b.add_argument("--models-dir", default="/tmp/models")
    b.add_argument("--out", default=None, help="append result lines (JSON) here, for `merge`")
    b.add_argument("--tiny", action="store_true", help="two-layer models of the presets' types (CPU dry run)")
    b.add_argument("--cpu", action="store_true", help="let the bitsandbytes path run on a CPU (dry run)")
    b.set_defaults(func=cmd_bnbfit)
    s = sub.add_parser("sweep", help="run a plan, one process per configuration")
    s.add_argument("--plan", choices=["autofit", "anchors", "calibrate", "all"], default="autofit")
    s.add_argument("--models", default=None, help="comma-separated preset keys to keep")
    s.add_argument("--out", default=None, help="append result lines (JSON) here")
    s.add_argument("--paths", default=None, help="comma-separated loading paths to keep (unsloth,bnb)")
    s.add_argument("--cap-gib", type=float, default=7.5)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--timeout", type=int, default=420)
    s.add_argument("--models-dir", default="/tmp/models")
    s.add_argument("--cleanup", action="store_true", help="delete each random checkpoint after its runs")
    s.add_argument("--grad-accum", type=int, default=None,
                   help="override auto-fit's accumulation (peak memory does not depend on it; 1 is fastest)")
    s.set_defaults(func=cmd_sweep)
    m = sub.add_parser("merge", help="add measured runs to tests/fixtures/memory_points.json")
    m.add_argument("results")
    m.set_defaults(func=cmd_merge)
    f = sub.add_parser("fit", help="recalibrate the estimate's constants on the fixture table")
    f.set_defaults(func=cmd_fit)
    t = sub.add_parser("table", help="estimate vs measured as a markdown table")
    t.add_argument("results", nargs="?", default=None)
    t.set_defaults(func=cmd_table)
    a = ap.parse_args(argv)
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
