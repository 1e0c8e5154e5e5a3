"""A base model in the precision it is stored in (16/32-bit), never 4-bit: what merging an adapter needs.

A run trained in 4-bit (QLoRA) is merged into the original-precision weights, not the quantized ones; a base
checkpoint that is itself stored in 4-bit is dequantized layer by layer first (CUDA).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from studio.models.load import ModelLoadError, prepare_tokenizer, resolve_source

Progress = Callable[[str], None] | None


def _source_dtype(path: str):
    import torch

    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def _is_prequantized(path: str) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(cfg.get("quantization_config"))


def load_base_full(cfg, progress: Progress = None):
    """The run's base model in its stored 16/32-bit precision on the CPU (never 4-bit), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(cfg.model.name_or_path, progress)
    dtype = _source_dtype(source.path)
    tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    if _is_prequantized(source.path):
        model = load_dequantized(source.path, dtype, cfg.model.trust_remote_code, progress)
    else:
        if progress:
            progress(f"Loading {cfg.model.name_or_path} in {str(dtype).removeprefix('torch.')} (not 4-bit) to merge…")
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    return model, prepare_tokenizer(tok)


def load_dequantized(path: str, dtype, trust_remote_code: bool, progress: Progress = None):
    """A base checkpoint stored in bitsandbytes 4-bit: load it on the GPU, then dequantize one layer at a time onto
    the CPU so a model larger than the GPU in 16-bit still fits."""
    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        raise ModelLoadError(f"the base model at {path} is stored in 4-bit; dequantizing it needs a CUDA GPU. Export "
                          "on the GPU machine, or train from the 16-bit original of this model")
    import bitsandbytes as bnb

    if progress:
        progress("The base checkpoint is stored in 4-bit: dequantizing it to 16-bit layer by layer…")
    dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to("cpu", dtype)
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="cpu",
                                  dtype=dtype)
            lin.weight.data.copy_(w)
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias.data.to("cpu", dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
            del w
    model.to("cpu")
    torch.cuda.empty_cache()
    # the same cleanup transformers' own dequantize() ends with: an ordinary, saveable 16-bit model
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    forget_load_conversions(model)
    return model


def forget_load_conversions(model) -> None:
    """Drop the weight conversions ``from_pretrained`` recorded for loading this model. Loading a 4-bit checkpoint
    records bitsandbytes' deserialization among them, which has no inverse, so ``save_pretrained`` (which reverts
    them) fails with a bare NotImplementedError once the weights are plain 16-bit. Without the record transformers
    reverts its default mapping for the architecture, as for a model built in memory."""
    if "_weight_conversions" in vars(model):
        del model._weight_conversions
