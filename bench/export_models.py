"""Runs to export without training: a base checkpoint (random weights, real or tiny config; 16-bit or stored in
bitsandbytes NF4 like the ``unsloth/*-bnb-4bit`` repos) and a random, non-zero LoRA adapter in a studio run folder.

Used by tests/test_export_nf4.py (tiny configs, CPU) and bench/export_gpu.py (7-8B configs). The adapter is written
from the config's shapes alone, so a 7B adapter never needs the 7B model in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# small configs of the three GGUF families (rows a multiple of 32, so every GGUF type quantizes them)
TINY = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  max_position_embeddings=512, rope_theta=5e5, rms_norm_eps=1e-5),
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6),
}


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer():
    """A byte-level BPE tokenizer that can spell any text (the 256 byte symbols, merges for a space before a lower-case
    letter and the commonest English pairs), with ChatML special tokens and chat template, as Qwen's and SmolLM's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("\u0120", c) for c in "abcdefghijklmnopqrstuvwxyz"]
    merges += [tuple(p) for p in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")  # BOS never added, but named, as in Qwen's config
    tok.chat_template = CHATML
    return tok


def base_model(arch: str, root: str, spec: dict | None = None, device: str = "cpu") -> str:
    """A checkpoint of ``arch`` (a TINY key, or any name with a config ``spec``) with random bf16 weights and
    ``tokenizer()``, built once under ``root``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = os.path.join(root, arch)
    if os.path.exists(os.path.join(d, "done")):
        return d
    tok = tokenizer()
    spec = dict(spec if spec is not None else dict(TINY[arch], vocab_size=len(tok)))
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(d, max_shard_size="2GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tok.save_pretrained(d)
    Path(d, "done").write_text("ok")
    return d


def quantize_nf4(src: str, dst: str, double_quant: bool = True) -> str:
    """``src`` stored as bitsandbytes NF4, as the ``unsloth/*-bnb-4bit`` repos are (quantized on the GPU when there
    is one, else on the CPU; bitsandbytes 0.46+ quantizes on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if os.path.exists(os.path.join(dst, "done")):
        return dst
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = AutoModelForCausalLM.from_pretrained(src, device_map={"": device}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16))
    q.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    del q
    if device == "cuda":
        torch.cuda.empty_cache()
    Path(dst, "done").write_text("ok")
    return dst


def lora_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer LoRA targets, by its module name, from a config.json dict."""
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    inter = config["intermediate_size"]
    per_layer = {"self_attn.q_proj": (n_head * head_dim, hidden), "self_attn.k_proj": (n_kv * head_dim, hidden),
                 "self_attn.v_proj": (n_kv * head_dim, hidden), "self_attn.o_proj": (hidden, n_head * head_dim),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{k}": v for i in range(config["num_hidden_layers"]) for k, v in per_layer.items()}


def random_lora_run(base: str, run_dir: str | Path, *, r: int = 8, alpha: int = 16, std: float = 0.02,
                    seed: int = 0, use_rslora: bool = False) -> Path:
    """A studio run folder (run.yaml + adapter/) whose adapter is a random LoRA of rank ``r`` on every linear layer
    of ``base``: A like PEFT's initialisation, B ~ N(0, std) instead of zero, so the update is not zero."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from studio.config.run import RunConfig
    from studio.runs import folder

    run_dir = Path(run_dir)
    config = json.loads(Path(base, "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_out, n_in) in lora_shapes(config).items():
        prefix = f"base_model.model.{module}"
        tensors[prefix + ".lora_A.weight"] = (torch.rand(r, n_in, generator=gen) * 2 - 1) / n_in ** 0.5
        tensors[prefix + ".lora_B.weight"] = torch.randn(n_out, r, generator=gen) * std
    adapter = run_dir / folder.ADAPTER_DIR
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, task_type="CAUSAL_LM", use_rslora=use_rslora,
               base_model_name_or_path=str(base)).save_pretrained(str(adapter))
    cfg = RunConfig().updated({"name": run_dir.name, "output_dir": str(run_dir), "model.name_or_path": str(base),
                               "lora.r": r, "lora.lora_alpha": alpha})
    folder.write_config(run_dir, cfg)
    return run_dir
