"""A base model's weights in full precision, never 4-bit: what merging an adapter and checking an export need.

- ``BaseWeights`` reads a checkpoint tensor by tensor from its safetensors files. A weight stored in bitsandbytes
  4-bit (NF4 or FP4, with or without double quantization: the ``unsloth/*-bnb-4bit`` repos) is dequantized by
  bitsandbytes' own ``dequantize_4bit`` from the stored quantization state, so it is exactly the matrix the 4-bit
  kernel multiplies with; on the GPU when there is one, else on the CPU. One tensor at a time: an 8B model never
  needs a float32 copy of itself in memory.
- ``load_base_full`` loads the base for the adapter export's check; ``exact_4bit`` and ``float32_compute`` make a
  loaded model compute in float32 (the 4-bit one on those dequantized matrices, a 16-bit one a layer at a time), so
  an export is compared with the trained model without 16-bit rounding noise in the comparison itself.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

from studio.models.load import ModelLoadError, prepare_tokenizer, resolve_source

Progress = Callable[[str], None] | None
_QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QUANT_STATE = "quant_state.bitsandbytes__"


def _config(path: str | Path) -> dict:
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _dtype(name) -> object:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name).removeprefix("torch."),
                                                                      torch.float32)


def stored_dtype(path: str | Path):
    """The dtype the checkpoint's config says its weights are in (float32 when it says nothing)."""
    cfg = _config(path)
    return _dtype(cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
                  or "float32")


def is_prequantized(path: str | Path) -> bool:
    return bool(_config(path).get("quantization_config"))


class BaseWeights:
    """The tensors of a local checkpoint, read one at a time as float32 on the CPU (4-bit weights dequantized)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        quant = _config(self.path).get("quantization_config") or {}
        if quant and not (quant.get("quant_method") == "bitsandbytes" and
                          (quant.get("load_in_4bit") or quant.get("_load_in_4bit"))):
            raise ModelLoadError(f"the base model at {path} is stored quantized as {quant.get('quant_method')} "
                                 f"{'8-bit' if quant.get('load_in_8bit') else ''}; merging supports 16/32-bit "
                                 "checkpoints and bitsandbytes 4-bit ones. Train from the 16-bit original instead")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ModelLoadError(f"{path} holds no safetensors weights (model.safetensors): merging reads "
                                 "safetensors only; save the model with save_pretrained(safe_serialization=True)")
        self._files = [safe_open(str(self.path / f), "pt") for f in files]
        self._where: dict[str, object] = {}
        for f in self._files:
            for k in f.keys():
                self._where[k] = f
        self.quantized = {k.rsplit("." + _QUANT_STATE, 1)[0] for k in self._where if "." + _QUANT_STATE in k}
        aux = {f"{w}.{p}" for w in self.quantized for p in _QUANT_PARTS}
        aux |= {k for k in self._where if "." + _QUANT_STATE in k}
        self._names = [k for k in self._where if k not in aux]
        self._state_cache: dict[str, dict] = {}
        self.device = device or _dequantize_device()

    def names(self) -> list[str]:
        return list(self._names)

    def _state(self, name: str) -> dict:
        if name not in self._state_cache:
            key = next(k for k in self._where if k.startswith(name + "." + _QUANT_STATE))
            self._state_cache[name] = json.loads(bytes(self._where[key].get_tensor(key).tolist()))
        return self._state_cache[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.quantized:
            return tuple(self._state(name)["shape"])
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str):
        """The dtype the tensor had before it was quantized (as stored, for the others)."""
        if name in self.quantized:
            return _dtype(self._state(name)["dtype"])
        return _dtype({"BF16": "bfloat16", "F16": "float16"}.get(self._where[name].get_slice(name).get_dtype(),
                                                                 "float32"))

    def raw(self, name: str):
        """The tensor as stored (4-bit weights: the dequantized matrix in the dtype it was quantized from)."""
        import bitsandbytes.functional as bnbf
        import torch

        if name not in self.quantized:
            return self._where[name].get_tensor(name)
        parts = {p: self._where[f"{name}.{p}"].get_tensor(f"{name}.{p}") for p in _QUANT_PARTS
                 if f"{name}.{p}" in self._where}
        key = next(k for k in self._where if k.startswith(name + "." + _QUANT_STATE))
        parts[key.removeprefix(name + ".")] = self._where[key].get_tensor(key)
        device = torch.device(self.device)
        state = bnbf.QuantState.from_dict(parts, device=device)
        packed = self._where[name].get_tensor(name).to(device)
        return bnbf.dequantize_4bit(packed, state).to("cpu")

    def get(self, name: str):
        """The tensor as float32 on the CPU, a copy of its own (safetensors hands out views of one memory map, so a
        change to one tensor it returned would show in every later read of that tensor)."""
        import torch

        return self.raw(name).to(torch.float32, copy=True)

    def items(self) -> Iterator[tuple[str, object]]:
        for name in self._names:
            yield name, self.get(name)


def _dequantize_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def merged_dtype(path: str | Path):
    """The dtype a merged model is saved in: the checkpoint's own 16/32-bit dtype; for a 4-bit-stored checkpoint the
    16-bit dtype its weights were quantized from, bfloat16 when that was float32 (as the 4-bit kernel computes)."""
    import torch

    if not is_prequantized(path):
        return stored_dtype(path)
    weights = BaseWeights(path, device="cpu")
    first = next(iter(sorted(weights.quantized)), None)
    dtype = weights.dtype(first) if first else stored_dtype(path)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


GIB = 2**30


def gpu_room_bytes(budget_gib: float | None = None) -> int:
    """How many more bytes this process may allocate on the GPU: the card's free memory plus what PyTorch holds
    cached, capped by the process's memory fraction and by ``budget_gib`` (the run's ``model.gpu_memory_gib``: what
    the studio may use of the card in all, the Chat tab's model and a finished run's leftovers included)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    used, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    room = free + (reserved - used)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    room = min(room, int(fraction * total) - used)
    if budget_gib:
        room = min(room, int(budget_gib * GIB) - used)
    return max(0, room)


def check_device(n_bytes: int, budget_gib: float | None = None) -> str:
    """Where a model of ``n_bytes`` runs for an export's check: the GPU when it fits in the room left there
    (``gpu_room_bytes``: the run's budget, less what this process already holds) with room to spare for the
    float32 arithmetic (an H100 holds an 8B model in bf16), else the CPU (an 8 GB card does not)."""
    return "cuda" if 0 < n_bytes < 0.6 * gpu_room_bytes(budget_gib) else "cpu"


def checkpoint_bytes(path: str | Path) -> int:
    """The size of a checkpoint's weight files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_base_full(cfg, progress: Progress = None):
    """The run's base model as the adapter saw it, and its tokenizer: a 16/32-bit checkpoint in its own dtype (on the
    GPU when it fits there, else the CPU); a 4-bit-stored one as stored, ``exact_4bit`` computing on its dequantized
    matrices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(cfg.model.name_or_path, progress)
    tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    if is_prequantized(source.path):
        model = load_4bit(source.path, cfg.model.trust_remote_code, progress, budget_gib=cfg.model.gpu_memory_gib)
    else:
        dtype = stored_dtype(source.path)
        if progress:
            progress(f"Loading {cfg.model.name_or_path} in {str(dtype).removeprefix('torch.')} (not 4-bit)…")
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                     device_map={"": check_device(checkpoint_bytes(source.path),
                                                                                   cfg.model.gpu_memory_gib)},
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    return model, prepare_tokenizer(tok)


def load_4bit(path: str, trust_remote_code: bool = False, progress: Progress = None,
              budget_gib: float | None = None):
    """A 4-bit-stored checkpoint loaded as stored: bitsandbytes on the GPU when it fits in the room the budget leaves
    (``check_device``), else on the CPU; its other weights in the dtype they are stored in (lossless: arithmetic in
    float32 comes from ``float32_compute``, not from a float32 copy, which for a 128k vocabulary is 4 GB of
    embeddings and head); the 4-bit layers computing in float32 on their dequantized matrices (``exact_4bit``)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = check_device(checkpoint_bytes(path), budget_gib) if _dequantize_device() == "cuda" else "cpu"
    if progress:
        progress(f"Loading the 4-bit base model stored at {path} ({'GPU' if device == 'cuda' else 'CPU'})…")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=stored_dtype(path), device_map={"": device},
                                                     trust_remote_code=trust_remote_code)
    except torch.OutOfMemoryError:
        if device == "cpu":
            raise
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=stored_dtype(path), device_map={"": "cpu"},
                                                     trust_remote_code=trust_remote_code)
    exact_4bit(model)
    return model.eval()


def exact_4bit(model) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` compute ``x @ W.T`` in float32 with ``W`` its dequantized
    matrix (``dequantize_4bit``, as the kernel dequantizes), instead of the kernel's 16-bit arithmetic (and, on CPUs
    with AVX-512 BF16, a repacked bfloat16 path that ignores the compute dtype). Returns how many layers."""
    import bitsandbytes as bnb
    import torch

    def forward(mod, x):
        w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(torch.float32)
        bias = None if mod.bias is None else mod.bias.to(torch.float32)
        return torch.nn.functional.linear(x.to(torch.float32), w, bias).to(x.dtype)

    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.forward = forward.__get__(mod)
            n += 1
    return n


TILE_ELEMENTS = 2**24  # a big matrix (a 128k-vocabulary LM head) is upcast this many elements at a time: 64 MiB


@contextlib.contextmanager
def float32_compute(model):
    """Run a 16-bit model's forward in float32 without a float32 copy of it: each module with weights of its own is
    upcast just before it runs and cast back right after (16 -> 32 -> 16 bits is lossless). An embedding is not
    upcast (looking a row up is exact: its output is cast instead), and a linear layer larger than ``TILE_ELEMENTS``
    (an LM head: 2 GB in float32 for a 128k vocabulary) multiplies a tile of rows at a time, so the float32 memory
    the check needs stays small on an 8 GB card."""
    import torch

    hooks, tiled = [], []

    def up(mod, args):
        mod._studio_dtype = next(mod.parameters(recurse=False)).dtype
        mod.to(torch.float32)
        return _float32_args(args)

    def down(mod, args, out):
        mod.to(mod._studio_dtype)
        return out

    def embedded(mod, args, out):
        return out.to(torch.float32) if torch.is_tensor(out) and out.is_floating_point() else out

    for mod in model.modules():
        params = list(mod.parameters(recurse=False))
        if not (params and all(p.is_floating_point() and p.dtype != torch.float32 for p in params)):
            continue
        if isinstance(mod, torch.nn.Embedding):
            hooks.append(mod.register_forward_hook(embedded))
        elif type(mod) is torch.nn.Linear and mod.weight.numel() > TILE_ELEMENTS:
            mod.forward = _tiled_float32_linear.__get__(mod)
            tiled.append(mod)
        else:
            hooks += [mod.register_forward_pre_hook(up), mod.register_forward_hook(down)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        for mod in tiled:
            del mod.forward  # back to the class's


def _float32_args(args):
    import torch

    return tuple(a.to(torch.float32) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _tiled_float32_linear(mod, x):
    """``x @ W.T + b`` in float32 for a 16-bit ``W``, upcasting ``TILE_ELEMENTS`` of it at a time."""
    import torch

    x = x.to(torch.float32)
    rows = max(1, TILE_ELEMENTS // mod.in_features)
    parts = []
    for i in range(0, mod.out_features, rows):
        bias = None if mod.bias is None else mod.bias[i:i + rows].to(torch.float32)
        parts.append(torch.nn.functional.linear(x, mod.weight[i:i + rows].to(torch.float32), bias))
    return torch.cat(parts, dim=-1)
