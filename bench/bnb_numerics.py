"""Does keeping embeddings, LM head and norms 16-bit change what a bitsandbytes KTO run learns? A CPU experiment.

    python bench/bnb_numerics.py [--steps 8] [--model PATH]

The bundled SmolLM2-135M (real weights) is loaded in NF4 by the studio's bitsandbytes loading function
(``studio.models.load.load_transformers``; bitsandbytes' CPU backend runs NF4) twice: with the studio's preparation
(``prepare_4bit_for_training``: nothing upcast, the run plan's rule) and with PEFT's ``prepare_model_for_kbit_training``
(embeddings, head and norms upcast to float32, as the path did before issue 27). Each trains the same LoRA on the
sample data's first 32 rows with TRL's KTOTrainer (bf16 compute, as on a GPU), same seed, then scores the other 16
rows. Prints per step the loss of both, and for the held-out desirable completions the mean log-prob per token
before and after training on both, and their differences. Nothing is asserted; figures in the commit message that
added it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(prep: str, path: str, rows: list[dict], held: list[dict], steps: int, out: str) -> dict:
    import peft
    import torch
    from datasets import Dataset

    from studio.config.run import RunConfig
    from studio.models import load as models
    from studio.training import logprob, trl_seam
    from studio.tuned import evaluate

    if prep == "peft-upcast":  # the path as it was: PEFT's preparation inside the same loader
        def prepare(model, gradient_checkpointing=True):
            return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        models.prepare_4bit_for_training, saved = prepare, models.prepare_4bit_for_training
    cfg = RunConfig().updated({"name": prep, "output_dir": os.path.join(out, prep), "model.name_or_path": path,
                               "model.backend": "bnb", "lora.r": 16, "lora.lora_alpha": 32, "kto.max_length": 256,
                               "train.max_steps": steps, "train.per_device_train_batch_size": 4,
                               "train.gradient_accumulation_steps": 1, "train.learning_rate": 5e-4,
                               "train.warmup_steps": 0.0, "train.save_steps": 10_000, "train.seed": 0,
                               "train.gradient_checkpointing": True})
    try:
        model, tok = models.load_transformers(cfg, path, torch.bfloat16, "bnb", models.DeviceInfo(kind="cpu", name="cpu"),
                                              getattr(torch, models.frozen_dtype_name("bnb", "bfloat16")))
    finally:
        if prep == "peft-upcast":
            models.prepare_4bit_for_training = saved
    tok = models.prepare_tokenizer(tok)
    dtypes = sorted({str(p.dtype) for n, p in model.named_parameters()
                     if type(p).__name__ != "Params4bit" and "lora_" not in n})
    logprob.install_fallback(force=True)
    good = [r for r in held if r["label"]]
    model.eval()
    before = evaluate.evaluate_rows(model, tok, good, beta=0.1, max_length=256)
    args = trl_seam.kto_config(cfg, device="cpu", bf16=True, precompute_ref_log_probs=False, logging_steps=1)
    trainer = trl_seam.kto_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                           processing_class=tok)
    trainer.train()
    losses = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    after = evaluate.evaluate_rows(model, tok, good, beta=0.1, max_length=256)
    per_token = lambda res, k: [r[k] / r["n_tokens"] for r in res["rows"]]  # noqa: E731
    return {"prep": prep, "frozen_dtypes": dtypes, "losses": losses,
            "base_logp_per_token": per_token(before, "base_logp"), "tuned_logp_per_token": per_token(after, "tuned_logp")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2-135M)")
    a = ap.parse_args()
    import bitsandbytes.nn.modules as bnb_modules

    from studio.models import bundled

    # bitsandbytes' CPU inference format (AVX-512 BF16 CPUs) repacks a layer at its first no-gradient pass and then
    # runs an inference kernel in training too: kept off so both runs train through the same NF4 kernel as a GPU
    bnb_modules.has_avx512bf16 = lambda: False

    from studio.data import load_kto

    path = a.model or str(bundled.ensure_checkpoint())
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studio", "samples",
                          "sample_kto.jsonl")
    rows = load_kto(sample).rows  # normalized as the engine reads them (chat messages)
    train, held = rows[:32], rows[32:]
    out = tempfile.mkdtemp(prefix="bnb_numerics_")
    results = [run(p, path, train, held, a.steps, out) for p in ("studio", "peft-upcast")]
    for r in results:
        print(f"RESULT {json.dumps(r)}")
    s, u = results

    def mean(xs):
        return sum(xs) / len(xs)

    def gap(k):
        return max(abs(x - y) for x, y in zip(s[k], u[k]))

    print(f"frozen weights: studio {s['frozen_dtypes']}, PEFT {u['frozen_dtypes']}")
    print("step | loss studio | loss PEFT upcast | diff")
    for i, (x, y) in enumerate(zip(s["losses"], u["losses"]), 1):
        print(f"{i} | {x:.5f} | {y:.5f} | {x - y:+.5f}")
    for k, label in (("base_logp_per_token", "before training"), ("tuned_logp_per_token", f"after {a.steps} steps")):
        print(f"held-out desirable log-prob per token {label}: studio {mean(s[k]):.4f}, PEFT upcast {mean(u[k]):.4f}"
              f" (largest per-row gap {gap(k):.4f} nats/token, {len(s[k])} rows)")
    drift = [mean(r["tuned_logp_per_token"]) - mean(r["base_logp_per_token"]) for r in results]
    print(f"drift (after - before): studio {drift[0]:+.4f}, PEFT upcast {drift[1]:+.4f} nats/token")


if __name__ == "__main__":
    main()
