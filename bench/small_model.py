"""The bundled model's first run: one epoch of the default run config, start to saved adapter, beside plain TRL.

    python bench/small_model.py --recipe studio                       # the studio engine, its default run config
    python bench/small_model.py --recipe trl                          # plain TRL KTOTrainer + PEFT LoRA, same settings
    python bench/small_model.py --recipe studio --profile 6           # torch profiler over 6 steps: where a step goes
    python bench/small_model.py --recipe studio --set train.max_steps=20 --limit 400

Both recipes train the bundled SmolLM2-135M-Instruct on the same KTO rows (the HH dev pairs as the studio converts
them: conversation prompt + final reply, unpaired) with the same effective batch, max_length, learning rate and
epochs. The plain recipe is written as TRL's guide writes it: the model in the card's 16-bit dtype, a PEFT
LoraConfig handed to KTOTrainer, KTOConfig's own defaults for everything else (gradient checkpointing on, reference
log-probs in every step). The clock runs from the start of the recipe (model load included) to the adapter on disk.
One recipe per process. Prints RESULT {...}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless-dev.jsonl.gz"


class StepClock:
    """Wall time of every optimizer step (a transformers callback)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                clock.steps.append(time.perf_counter() - clock._t)

        self.steps: list[float] = []
        self._t = 0.0
        self.callback = _CB()


class Profile:
    """torch.profiler over optimizer steps 2..2+n (a transformers callback); prints the top ops on train end."""

    def __init__(self, n: int, out: str | None):
        import torch
        from transformers import TrainerCallback

        prof = self
        self.n, self.out, self.p = n, out, None
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 2 and prof.p is None:
                    prof.p = torch.profiler.profile(activities=acts, record_shapes=False)
                    prof.p.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if prof.p is not None and state.global_step == 2 + prof.n:
                    _sync()
                    prof.p.__exit__(None, None, None)
                    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    print(prof.p.key_averages().table(sort_by=key, row_limit=30), flush=True)
                    print(prof.p.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)
                    if prof.out:
                        prof.p.export_chrome_trace(prof.out)
                    prof.p = None

        self.callback = _CB()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rows_file(data: str, limit: int | None, work: Path) -> tuple[str, int]:
    """The studio's KTO rows of ``data`` written as JSONL (both recipes read the same rows)."""
    from studio.data import load_kto

    rows = load_kto(data).rows
    if limit:
        rows = rows[:limit]
    path = work / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "label")}, ensure_ascii=False) + "\n")
    return str(path), len(rows)


def studio(rows: str, work: Path, a) -> dict:
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    t0 = time.perf_counter()
    changes = {"name": "small", "output_dir": str(work / "studio"), "data.train_file": rows,
               "train.num_train_epochs": a.epochs, "train.save_steps": 100_000}
    for kv in a.set:
        k, v = kv.split("=", 1)
        import yaml

        changes[k] = yaml.safe_load(v)
    cfg = RunConfig().updated(changes)
    engine = Engine()
    clock = StepClock()
    engine.extra_callbacks.append(clock.callback)
    if a.profile:
        engine.extra_callbacks.append(Profile(a.profile, a.trace).callback)
    job = engine.start(cfg)
    engine.wait()
    wall = time.perf_counter() - t0
    metrics = [m for m in job.metrics() if "loss" in m]
    statuses = [e.get("message") for e in job.events if e["type"] == "status"]
    return {"wall_s": round(wall, 1), "state": job.state, "error": job.error, "steps": len(clock.steps),
            "config": {k: changes[k] for k in changes if k not in ("output_dir", "data.train_file")},
            "batch": cfg.train.per_device_train_batch_size, "grad_accum": cfg.train.gradient_accumulation_steps,
            "num_tokens": metrics[-1].get("num_tokens") if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None, "status": statuses[-8:],
            **_step_stats(clock.steps)}


def trl(rows: str, work: Path, a) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from studio.models import bundled
    from studio.training import logprob
    from studio.config.run import RunConfig

    d = RunConfig()  # the studio's defaults, so both recipes train with the same numbers
    t0 = time.perf_counter()
    path = str(bundled.ensure_checkpoint())
    cuda = torch.cuda.is_available()
    if not cuda:
        logprob.install_fallback(force=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    ds = load_dataset("json", data_files=rows, split="train")
    args = KTOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=d.train.per_device_train_batch_size,
                     gradient_accumulation_steps=d.train.gradient_accumulation_steps, num_train_epochs=a.epochs,
                     learning_rate=d.train.learning_rate, lr_scheduler_type=d.train.lr_scheduler_type,
                     warmup_steps=d.train.warmup_steps, max_length=d.kto.max_length, beta=d.kto.beta,
                     bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True)
    peft = LoraConfig(r=d.lora.r, lora_alpha=d.lora.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = StepClock()
    cbs = [clock.callback] + ([Profile(a.profile, a.trace).callback] if a.profile else [])
    trainer = KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=cbs)
    trainer.train()
    trainer.save_model(str(work / "trl" / "adapter"))
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": round(wall, 1), "steps": len(clock.steps), "batch": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps,
            "num_tokens": logs[-1].get("num_tokens") if logs else None,
            "last_loss": logs[-1]["loss"] if logs else None, **_step_stats(clock.steps)}


def _step_stats(steps: list[float]) -> dict:
    if not steps:
        return {}
    steady = steps[2:] or steps
    return {"step_s_median": round(statistics.median(steady), 4), "step_s_first": round(steps[0], 2),
            "steps_s_total": round(sum(steps), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["studio", "trl"], required=True)
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--limit", type=int, default=None, help="first N KTO rows only")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], help="studio run config override, key=value")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps (from step 3)")
    ap.add_argument("--trace", default=None, help="write the profile as a Chrome trace here")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    import torch

    work = Path(a.work or tempfile.mkdtemp(prefix="small_model_"))
    work.mkdir(parents=True, exist_ok=True)
    from studio.models import bundled

    bundled.ensure_checkpoint()  # converted once, outside the clock (both recipes read the converted checkpoint)
    rows, n = rows_file(a.data, a.limit, work)
    result = {"recipe": a.recipe, "rows": n, "epochs": a.epochs,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads()}
    result.update(studio(rows, work, a) if a.recipe == "studio" else trl(rows, work, a))
    if n and result.get("wall_s"):
        result["rows_per_s"] = round(n * a.epochs / result["wall_s"], 1)
        if result.get("num_tokens"):
            result["tokens_per_s"] = round(result["num_tokens"] / result["wall_s"])
    if torch.cuda.is_available():
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
