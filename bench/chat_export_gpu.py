"""GPU check of the Chat tab's core on the 4-bit (QLoRA) paths: chat, evaluation and every export.

    python bench/chat_export_gpu.py                # needs CUDA and bitsandbytes; prints RESULT {...}

What it does, with the bundled SmolLM2-135M used as a *local* model (the bundled id itself trains in 16-bit):
1. trains 6 steps with model.backend 'bnb' (NF4 base + LoRA), so the chat must load the base in NF4 as training did;
2. chats: adapter off vs on logits, the base side against a separately loaded NF4 model, tokens/s per side;
3. evaluates 16 held-out rows (rows/s);
4. exports adapter, merged (the base reloaded in its stored precision, never merged into 4-bit weights) and GGUF,
   each loaded back;
5. repeats 1 and the merged export from a base checkpoint that is itself stored in 4-bit, which the export must
   dequantize layer by layer.
Figures are printed (a RESULT line after step 4, another at the end), nothing is asserted beyond each step's own
checks.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(base_path: str, out: Path, name: str) -> Path:
    from studio.config.run import RunConfig
    from studio.training.engine import Engine

    cfg = RunConfig().updated({
        "name": name, "output_dir": str(out / name), "model.name_or_path": base_path, "model.backend": "bnb",
        "model.load_in_4bit": True, "lora.r": 8, "lora.lora_alpha": 16, "kto.max_length": 256,
        "train.max_steps": 6, "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
        "train.save_steps": 3, "train.learning_rate": 5e-4, "train.warmup_steps": 0.0, "data.eval_fraction": 0.3,
    })
    if "model.memory_check" in _fields():
        cfg = cfg.updated({"model.memory_check": False})
    e = Engine()
    job = e.start(cfg)
    e.wait()
    if job.state != "finished":
        raise SystemExit(f"training failed: {job.error}")
    return cfg.run_dir()


def _fields() -> set[str]:
    from studio.config.run import RunConfig

    return {f"model.{k}" for k in RunConfig.model_fields["model"].annotation.model_fields}


def chat_figures(run_dir: Path) -> dict:
    import torch

    from studio.tuned.chat import ChatModel, GenerationSettings, build_messages

    chat = ChatModel()
    t = time.time()
    chat.use(run_dir)
    out = {"load_s": round(time.time() - t, 2), "quantized": chat.key.quantized,
           "gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    msgs = build_messages([], "Explain in two sentences why the sky is blue.")
    base, tuned = chat.logits(msgs, False), chat.logits(msgs, True)
    out["max_logit_change"] = float((tuned - base).abs().max())
    out["toggle_restores_base"] = bool(torch.equal(chat.logits(msgs, False), base))
    settings = GenerationSettings(max_new_tokens=128, temperature=0.7, seed=1)
    for side in ("base", "tuned"):
        torch.cuda.synchronize()
        t = time.time()
        text = chat.reply(msgs, side == "tuned", settings)
        torch.cuda.synchronize()
        n = len(chat.tokenizer(text, add_special_tokens=False)["input_ids"])
        out[f"{side}_tokens_per_s"] = round(n / (time.time() - t), 1)
        out[f"{side}_reply"] = text[:120]
    return out, chat


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from studio.models import bundled
    from studio.tuned import evaluate, export

    work = Path(tempfile.mkdtemp(prefix="chat_export_gpu_"))
    os.environ.setdefault("KTO_STUDIO_HOME", str(work / "home"))
    result: dict = {"gpu": torch.cuda.get_device_name(0)}
    base = str(bundled.ensure_checkpoint())

    t = time.time()
    run = train(base, work, "nf4")
    result["train_s"] = round(time.time() - t, 1)
    result["chat"], chat = chat_figures(run)

    t = time.time()
    ev = evaluate.evaluate_run(run, limit=16, chat_model=chat)
    result["eval"] = {"rows": ev["n_rows"], "rows_per_s": round(2 * ev["n_rows"] / (time.time() - t), 1),
                      "reward_margin": ev["rewards"]["margin"], "tuned_gap": ev["tuned"]["logp_gap"]}
    chat.unload()

    for fmt in export.FORMATS:
        t = time.time()
        r = export.export(run, fmt, work / "export" / fmt)
        result[f"export_{fmt}"] = {"s": round(time.time() - t, 1), "checks": r.checks}

    print("RESULT " + json.dumps(result, default=str), flush=True)  # a later failure must not hide these figures

    # a base checkpoint stored in 4-bit: the merged export has to dequantize it
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q_dir = work / "base-nf4"
    q = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": 0})
    q.save_pretrained(q_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(q_dir)
    del q
    torch.cuda.empty_cache()
    run_q = train(str(q_dir), work, "prequantized")
    t = time.time()
    r = export.export(run_q, "merged", work / "export" / "merged-from-nf4")
    result["export_merged_from_4bit_checkpoint"] = {"s": round(time.time() - t, 1), "checks": r.checks}

    print("RESULT " + json.dumps(result, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
