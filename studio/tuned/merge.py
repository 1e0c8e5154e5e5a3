"""Merging a LoRA adapter into its base model one tensor at a time, in float32.

For every weight of the base checkpoint (``studio.models.full_precision.BaseWeights``: a 4-bit-stored weight is the
matrix bitsandbytes' kernel computes with), the adapter's update ``scale * B @ A`` is added in float32 and the sum is
rounded once to the dtype the merged model is saved in. Nothing holds more than one tensor in float32, so an 8B
model merges in the RAM its 16-bit copy needs, and the merged weights go straight to safetensors shards or to a GGUF
file. ``ExportError`` lives here because every export writer (merged, GGUF, GGUF adapter) builds on this module.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from studio.errors import StudioError

Progress = Callable[[str], None] | None
SHARD_BYTES = 2 * 2**30  # merged safetensors shard size: bounds the memory one shard needs while it is written


class ExportError(StudioError, RuntimeError):
    """An export that cannot be made or failed its check; the message says why and what to do."""


@dataclass
class LoraWeights:
    """A PEFT LoRA adapter keyed by the base model's weight names: ``pairs[name] = (A, B, scale)`` with ``A`` of
    shape (r, in) and ``B`` (out, r), so the update of ``name`` is ``scale * B @ A``; ``replaced`` holds biases the
    run trained (``lora.bias`` 'all' or 'lora_only'), which replace the base model's."""

    config: dict
    pairs: dict[str, tuple] = field(default_factory=dict)
    replaced: dict[str, object] = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.config.get("r", 8)))

    def delta(self, name: str):
        import torch

        a, b, scale = self.pairs[name]
        return (b.to(torch.float32) @ a.to(torch.float32)) * scale

    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.pairs.values())


def _module_value(pattern: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module's dotted name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(adapter_dir: str | Path) -> LoraWeights:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors``; refuse what is not a plain LoRA."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"the adapter is {config.get('peft_type')}, not LoRA: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise ExportError("DoRA adapters are not supported by the export: train with plain LoRA")
    if config.get("modules_to_save"):
        raise ExportError(f"the adapter trains whole modules ({config['modules_to_save']}), which the export does "
                          "not merge: export the adapter and merge it with PEFT")
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        raise ExportError(f"{adapter_dir} has no adapter_model.safetensors")
    tensors = load_file(str(f))
    lora = LoraWeights(config)
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value
        elif name.endswith(".bias"):
            lora.replaced[name.replace(".base_layer.", ".")] = value
        else:
            raise ExportError(f"the adapter holds '{key}', which is neither a LoRA matrix nor a bias: the export "
                              "merges plain LoRA adapters only")
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"the adapter's {module} lacks lora_A or lora_B: the adapter file is damaged")
        a, b = ab["A"], ab["B"]
        if config.get("fan_in_fan_out"):
            a, b = b.T, a.T  # Conv1D layers store the update transposed
        r = a.shape[0]
        alpha = float(_module_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        lora.pairs[module + ".weight"] = (a, b, scale)
    return lora


class MergedWeights:
    """The merged model's tensors, one at a time: each base tensor (float32) plus its LoRA update, in float32."""

    def __init__(self, base, lora: LoraWeights):
        missing = (set(lora.pairs) | set(lora.replaced)) - set(base.names())
        if missing:
            raise ExportError(f"the adapter changes weights the base model does not have ({sorted(missing)[:3]}…): "
                              "it was trained on another model")
        self.base, self.lora = base, lora

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def get(self, name: str):
        if name in self.lora.replaced:
            return self.lora.replaced[name].float()
        w = self.base.get(name)
        if name in self.lora.pairs:
            w = w + self.lora.delta(name)
        return w

    def items(self) -> Iterator[tuple[str, object]]:
        for name in self.names():
            yield name, self.get(name)


def write_safetensors(tensors: Iterator[tuple[str, object]], out: Path, dtype, total: int,
                      progress: Progress = None, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write (name, tensor) pairs cast to ``dtype`` into safetensors shards of at most ``shard_bytes`` (one file when
    it fits) with the index transformers reads; returns the files written."""
    from safetensors.torch import save_file

    shard: dict[str, object] = {}
    size, shards, weight_map, total_bytes, done = 0, [], {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        shards.append(name)
        for k in shard:
            weight_map[k] = name
        shard, size = {}, 0

    for name, w in tensors:
        t = w.to(dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total_bytes += nbytes
        done += 1
        if progress and (done % 16 == 0 or done == total):
            progress(f"Merged {done}/{total} tensors ({total_bytes / 1e9:.2f} GB)…")
    if shard or not shards:
        flush()
    if len(shards) == 1:
        (out / shards[0]).rename(out / "model.safetensors")
        return ["model.safetensors"]
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return shards + ["model.safetensors.index.json"]


def write_config(source: Path, out: Path, dtype) -> list[str]:
    """The base model's config (without its quantization settings, in the merged dtype) and generation config."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = ["config.json"]
    if (source / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((source / "generation_config.json").read_bytes())
        files.append("generation_config.json")
    return files
