"""Whole-run wall clock: start to saved adapter, 2 epochs over 512 rows of realistic (varied) lengths.

    python bench/whole_run.py --recipe anchor --arch qwen2.5-3b     # the seed's Unsloth+TRL recipe, its defaults
    python bench/whole_run.py --recipe studio --arch qwen2.5-3b     # the studio engine, its own choices

The anchor recipe is the seed's (as in shared/bench/anchor_kto.py): Unsloth 4-bit, LoRA r16 on all projections,
KTO batch 2, no precomputation, rows in file order. The studio chooses its per-device batch with auto-fit under
the same memory cap, precomputes reference log-probs when that pays, and groups rows by length. Rows are random
words with prompt/completion lengths drawn like chat data (long-tailed), the same file for both.
One recipe per process (Unsloth patches libraries globally). Prints RESULT {...}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.random_models import WORDS  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_varied_dataset(path: str, n: int, seq: int, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    lengths = []
    with open(path, "w") as f:
        for _ in range(n):
            p = int(min(max(16, rnd.lognormvariate(math.log(150), 0.8)), seq * 0.7))
            c = int(min(max(8, rnd.lognormvariate(math.log(90), 0.7)), seq - p - 4))
            lengths.append(p + c)
            row = {"prompt": "".join(" " + rnd.choice(WORDS) for _ in range(p)),
                   "completion": "".join(" " + rnd.choice(WORDS) for _ in range(c)),
                   "label": rnd.random() < 0.5}
            f.write(json.dumps(row) + "\n")
    return {"rows": n, "mean_tokens": round(sum(lengths) / n, 1), "max_tokens": max(lengths)}


def anchor(model_dir: str, data: str, a) -> dict:
    if a.loader == "unsloth":
        from unsloth import FastLanguageModel
    import torch
    from datasets import load_dataset

    t0 = time.time()
    if a.loader == "unsloth":
        model, tok = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=a.seq, dtype=None,
                                                       load_in_4bit=True, local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0.0,
                                                 bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    else:  # CPU dry run of this script
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
        tok = AutoTokenizer.from_pretrained(model_dir)
    from studio.training import logprob
    from trl import KTOConfig, KTOTrainer

    cuda = torch.cuda.is_available()
    if not cuda:
        logprob.install_fallback(force=True)
    ds = load_dataset("json", data_files=data, split="train")
    cfg = KTOConfig(output_dir="/tmp/anchor_whole", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    num_train_epochs=2, learning_rate=5e-7, bf16=cuda, gradient_checkpointing=True,
                    optim="adamw_8bit" if cuda else "adamw_torch", logging_steps=1, report_to=[], save_strategy="no",
                    max_length=a.seq, dataset_num_proc=1, beta=0.1, use_cpu=not cuda, disable_tqdm=True)
    tr = KTOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    tr.train()
    tr.save_model("/tmp/anchor_whole/adapter")
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return {"wall_s": round(time.time() - t0, 1), "steps": tr.state.global_step, "per_device_batch": 2,
            "losses_finite": all(math.isfinite(x) for x in losses)}


def studio(model_dir: str, data: str, a) -> dict:
    if a.loader == "unsloth":
        import unsloth  # noqa: F401
    from studio.training import autofit, memory
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    t0 = time.time()
    backend = "unsloth" if a.loader == "unsloth" else "full"
    fit = autofit.auto_fit(memory.arch_for(model_dir), "unsloth" if backend == "unsloth" else "bnb", a.cap_gib,
                          seq=a.seq, effective_batch=a.max_batch)
    batch = fit.batch if fit.ok else 2
    cfg = RunConfig().updated({
        "name": "whole", "output_dir": "/tmp/studio_whole", "model.name_or_path": model_dir, "model.backend": backend,
        "lora.r": 16, "lora.lora_alpha": 16, "lora.target_modules": TARGETS, "kto.max_length": a.seq,
        "train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": 1,
        "train.num_train_epochs": 2.0, "train.save_steps": 100_000, "train.logging_steps": 1,
        "data.train_file": data,
    })
    engine = Engine()
    job = engine.start(cfg)
    engine.wait()
    metrics = [m for m in job.metrics() if "loss" in m]
    return {"wall_s": round(time.time() - t0, 1), "state": job.state, "error": job.error,
            "steps": metrics[-1]["step"] if metrics else 0, "per_device_batch": batch,
            "fit": fit.reason, "losses_finite": all(math.isfinite(m["loss"]) for m in metrics)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=["anchor", "studio"], required=True)
    ap.add_argument("--arch", default="qwen2.5-3b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cap-gib", type=float, default=7.5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--loader", choices=["unsloth", "plain"], default="unsloth", help="plain: CPU dry run")
    a = ap.parse_args()
    if a.loader == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    import torch

    from bench.random_models import make_model_dir

    cuda = torch.cuda.is_available()
    model_dir = make_model_dir(a.arch, device="cuda" if cuda else "cpu")
    data = f"/tmp/whole_{a.rows}_{a.seq}.jsonl"
    info = write_varied_dataset(data, a.rows, a.seq)
    if cuda and a.cap_gib > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
        torch.cuda.reset_peak_memory_stats()
    result = {"recipe": a.recipe, "arch": a.arch, "seq": a.seq, "cap_gib": a.cap_gib, "data": info}
    result.update(anchor(model_dir, data, a) if a.recipe == "anchor" else studio(model_dir, data, a))
    if cuda:
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
