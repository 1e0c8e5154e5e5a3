"""Reading a written GGUF file back: what ``gguf``'s own reader finds in it, compared with what was meant to go in.

- a model file: the architecture, file type, and every tensor's name, shape and type against the plan; the tensors
  themselves (all of a small model, the embeddings, head and three layers of a large one), dequantized by ``gguf``
  and compared with the merged weights they came from, within what their type allows (relative RMS error);
- a LoRA adapter file: ``general.type`` adapter, ``adapter.type`` lora and alpha, and every ``lora_a`` / ``lora_b``
  against the PEFT adapter, so that llama.cpp's ``alpha / r * B @ A`` is PEFT's update of that weight.

Logits (transformers' GGUF reader) and llama.cpp's own run are added by ``studio.tuned.export`` where affordable.
"""
from __future__ import annotations

from pathlib import Path

from studio.tuned.merge import ExportError

ALL_TENSORS_UP_TO = 2_000_000_000  # parameters: a model this small has every tensor compared; larger, a sample


def _rel_rmse(got, want) -> float:
    import torch

    denom = float(want.pow(2).mean().sqrt())
    return float((got - want).pow(2).mean().sqrt()) / max(denom, 1e-12)


def _array(t) -> object:
    """A reader tensor dequantized to float32, in numpy (row-major, torch's) shape."""
    import numpy as np
    from gguf import quants

    return np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(x) for x in reversed(t.shape)])


def check_model_file(path: Path, weights, lay, planned: list, n_params: int, as_written: dict | None = None) -> dict:
    """The file's tensors against the plan, and their values against ``weights`` (the merged model). With
    ``as_written`` (a dict, filled when every tensor is compared): each tensor as the file holds it, dequantized and
    in the model's own (HF) layout, by its HF name."""
    import torch
    from gguf import GGUFReader

    from studio.tuned import gguf_quant

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch != lay.arch:
        raise ExportError(f"the GGUF file says architecture '{arch}', not '{lay.arch}'")
    found = {t.name: t for t in reader.tensors}
    want = {p.gg_name: p for p in planned}
    if set(found) != set(want):
        missing, extra = sorted(set(want) - set(found))[:3], sorted(set(found) - set(want))[:3]
        raise ExportError(f"the GGUF file's tensors differ from the model's: missing {missing}, unexpected {extra}")
    for name, t in found.items():
        if tuple(int(x) for x in reversed(t.shape)) != tuple(want[name].shape):
            raise ExportError(f"GGUF tensor {name} has shape {list(t.shape)}, expected {list(want[name].shape)}")
    types: dict[str, int] = {}
    for t in found.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if n_params <= ALL_TENSORS_UP_TO:
        sample = [p for p in planned if p.hf_name is not None]
    else:
        layers = {0, lay.n_layer // 2, lay.n_layer - 1}
        sample = [p for p in planned if p.hf_name is not None and
                  (not p.gg_name.startswith("blk.") or int(p.gg_name.split(".")[1]) in layers)]
    worst: dict[str, float] = {}
    for p in sample:
        t = found[p.gg_name]
        got = torch.from_numpy(_array(t))
        ref = lay.permute(p.hf_name, weights.get(p.hf_name))
        err = _rel_rmse(got, ref)
        kind = t.tensor_type.name
        worst[kind] = max(worst.get(kind, 0.0), err)
        if err > gguf_quant.TOLERANCE.get(kind, 0.15):
            raise ExportError(f"GGUF tensor {p.gg_name} ({kind}) read back differs from the merged weight by "
                              f"{err:.3g} relative RMS, more than {kind} allows ({gguf_quant.TOLERANCE.get(kind)})")
        if as_written is not None and n_params <= ALL_TENSORS_UP_TO:
            as_written[p.hf_name] = lay.unpermute(p.hf_name, got)
    return {"loads_with_gguf_reader": True, "architecture": arch, "tensors": len(found), "tensor_types": types,
            "tensors_compared": len(sample), "worst_relative_rms_error": {k: round(v, 6) for k, v in worst.items()}}


def check_adapter_file(path: Path, lora, lay, alpha: float) -> dict:
    """The adapter file against the PEFT adapter: metadata, shapes, and llama.cpp's update against PEFT's."""
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha",
                                                        "general.architecture") if k in reader.fields}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise ExportError(f"the GGUF adapter's metadata is wrong: {fields}")
    if fields.get("general.architecture") != lay.arch or abs(fields["adapter.lora.alpha"] - alpha) > 1e-3 * alpha:
        raise ExportError(f"the GGUF adapter's architecture or alpha is wrong: {fields}")
    found = {t.name: t for t in reader.tensors}
    worst = 0.0
    for hf_name, (a, b, scale) in lora.pairs.items():
        gg = lay.gguf_name(hf_name)
        ta, tb = found.get(gg + ".lora_a"), found.get(gg + ".lora_b")
        if ta is None or tb is None:
            raise ExportError(f"the GGUF adapter lacks {gg}.lora_a / .lora_b")
        ga, gb = torch.from_numpy(_array(ta)), torch.from_numpy(_array(tb))
        rank = ga.shape[0]
        if tuple(ga.shape) != tuple(a.shape) or tuple(gb.shape) != tuple(b.shape):
            raise ExportError(f"GGUF adapter tensors of {gg} have shapes {list(ga.shape)}/{list(gb.shape)}, "
                              f"expected {list(a.shape)}/{list(b.shape)}")
        # what llama.cpp adds to the (permuted) weight, against PEFT's update permuted the same way
        err = _rel_rmse((alpha / rank) * (gb @ ga), lay.permute(hf_name, lora.delta(hf_name)))
        worst = max(worst, err)
        if err > 2e-3:
            raise ExportError(f"the GGUF adapter's update of {gg} differs from PEFT's by {err:.3g} relative RMS")
    if len(found) != 2 * len(lora.pairs):
        raise ExportError(f"the GGUF adapter holds {len(found)} tensors, expected {2 * len(lora.pairs)}")
    return {"loads_with_gguf_reader": True, **fields, "pairs": len(lora.pairs),
            "worst_update_relative_rms_error": round(worst, 7)}
