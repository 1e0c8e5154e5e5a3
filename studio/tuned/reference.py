"""The trained model as every export is checked against it, and what a merged export starts from.

The reference is the model the user trained and chats with: the run's adapter on its base as stored (a 4-bit base
through the matrices its kernel dequantizes, ``studio.models.full_precision.exact_4bit``), computed in float32
arithmetic so that comparing an export with it measures the export's weights, not 16-bit rounding of activations.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.runs import folder as run_folder

Progress = Callable[[str], None] | None
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."},
         {"role": "assistant", "content": "The capital of France is Paris."}]


def probe_ids(tok):
    import torch

    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(PROBE[0]["content"] + " " + PROBE[1]["content"])["input_ids"]
    return torch.tensor([list(ids)])


def probe_text(tok) -> str:
    """A chat rendered to text (special tokens included) plus characters that need byte fallback. Compared without
    adding BOS/EOS: transformers' GGUF reader ignores tokenizer.ggml.add_bos_token, which llama.cpp honours."""
    extra = " Ünïcödé ☃ 12×8 = 96."
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(PROBE, tokenize=False) + extra
    return PROBE[0]["content"] + " " + PROBE[1]["content"] + extra


@dataclass
class RunSource:
    """A run's adapter, its config, and where its base model's files are."""

    choice: Any
    cfg: Any
    base_path: Path
    quantized: bool  # the base checkpoint is stored in 4-bit

    def tokenizer(self):
        from transformers import AutoTokenizer

        from studio.models.load import prepare_tokenizer

        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(self.base_path),
                                                               trust_remote_code=self.cfg.model.trust_remote_code))

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.base_path), trust_remote_code=self.cfg.model.trust_remote_code)


def run_source(src, progress: Progress = None, download: bool = True) -> RunSource:
    """The run's adapter, config and base model files (downloaded when missing, unless ``download`` is False:
    then a hub model not in the cache raises instead)."""
    from studio.models import full_precision
    from studio.models.load import ModelLoadError, resolve_source
    from studio.tuned import chat

    choice = chat.resolve_adapter(src)
    cfg = run_folder.read_config(choice.run_dir)
    name = cfg.model.name_or_path
    if not download and name.count("/") == 1 and not Path(name).expanduser().exists():
        from huggingface_hub import snapshot_download

        from studio.models.hub import ALLOW_PATTERNS

        try:
            path = Path(snapshot_download(name, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
        except Exception:  # noqa: BLE001 - not (completely) downloaded
            raise ModelLoadError(f"{name} is not downloaded yet") from None
    else:
        path = Path(resolve_source(name, progress).path)
    return RunSource(choice, cfg, path, full_precision.is_prequantized(path))


def merged_weights(run: RunSource):
    from studio.models.full_precision import BaseWeights
    from studio.tuned.merge import MergedWeights, read_lora

    return MergedWeights(BaseWeights(run.base_path), read_lora(run.choice.path))


def reference_logits(run: RunSource, ids, progress: Progress = None, rounded_to=None):
    """The trained model's logits on ``ids``: the adapter on the base as stored, in float32 arithmetic.

    With ``rounded_to`` (a dtype), also the logits of the same model with each adapted layer's matrix merged by PEFT
    (``get_delta_weight``, in float32) and rounded once to that dtype: the unavoidable error of saving a merge in it,
    computed independently of the export's own merge; returned as (logits, floor)."""
    import gc

    import torch
    from peft import PeftModel

    from studio.models import full_precision

    if progress:
        progress("Computing the trained model's logits (the adapter on the base as stored) for the check…")
    base, _ = full_precision.load_base_full(run.cfg)
    model = PeftModel.from_pretrained(base, str(run.choice.path))
    floor = None
    with torch.inference_mode(), full_precision.float32_compute(model):
        logits = model(input_ids=ids.to(base.device)).logits.float().cpu()
        if rounded_to is not None:
            with merged_and_rounded(model, rounded_to):
                floor = model(input_ids=ids.to(base.device)).logits.float().cpu()
    del model, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits if rounded_to is None else (logits, floor)


def logits_of_weights(config, weights: dict, ids):
    """Logits on ``ids`` of the model ``config`` describes with exactly ``weights`` (HF names, float32 tensors, a
    tied head left out), computed in float32 on the CPU; None when ``weights`` lacks one of the model's tensors."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = model.load_state_dict(weights, strict=False, assign=True).missing_keys
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or any(p.is_meta for p in model.parameters()):
        return None
    with torch.inference_mode():
        out = model.eval()(input_ids=ids).logits.float()
    del model
    return out


@contextlib.contextmanager
def merged_and_rounded(model, dtype):
    """Within: every LoRA layer of the PEFT ``model`` computes in float32 with its base matrix (dequantized when
    stored in 4 bits) plus PEFT's own delta, the sum rounded to ``dtype``, as a merged model saved in ``dtype`` is."""
    import torch
    from peft.tuners.lora import LoraLayer

    def weight_of(layer):
        w = layer.weight
        if hasattr(w, "quant_state"):
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(w.data, w.quant_state)
        return w

    def forward(mod, x, *args, **kwargs):
        base = mod.get_base_layer()
        w = weight_of(base).to(torch.float32)
        for name in mod.active_adapters:
            if name in mod.lora_A:
                w = w + mod.get_delta_weight(name).to(torch.float32)
        w = w.to(dtype).to(torch.float32)
        bias = None if base.bias is None else base.bias.to(dtype).to(torch.float32)
        return torch.nn.functional.linear(x.to(torch.float32), w, bias).to(x.dtype)

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.forward = forward.__get__(m)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward  # back to the class's


# how far logits may be from the trained model's, by the precision of the weights that produced them: (max |diff| as
# a fraction of the largest logit, least share of positions predicting the same next token). float32: arithmetic in
# another order; 16-bit weights round each value to ~3 significant digits; 8- and 4-bit GGUF types lose more.
TOLERANCES = {"float32": (1e-3, 0.9), "16-bit": (0.02, 0.9), "8-bit": (0.1, 0.85), "4-bit": (0.5, 0.5)}


# how many times the measured floor (the reference merged and rounded as the output must be) a result
# may be off, and how much less often it may agree on the next token: a wrong merge is off by the adapter's effect
# or the weights' scale, far beyond rounding, while an exact merge saved in 16 bits sits at about the floor
FLOOR_FACTOR, FLOOR_AGREEMENT_SLACK = 2.0, 0.05


def compare(a, b, precision: str, floor=None) -> dict[str, Any]:
    """How close logits ``a`` are to the reference ``b``, and whether that is within what ``precision`` allows.

    ``floor``: the reference's logits with its weights rounded as ``a``'s had to be (``reference_logits``'s
    ``rounded_to``): a deep 4-bit-stored base rounded to 16 bits moves the logits by more than a fixed share of their
    scale, so the tolerance is the larger of the two."""
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    frac, least = TOLERANCES.get(precision, TOLERANCES["16-bit"])
    tol = frac * max(scale, 1.0)
    out = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "top1_agreement": agree, "precision": precision}
    if floor is not None:
        floor_diff = float((floor - b).abs().max())
        floor_agree = float((floor.argmax(-1) == b.argmax(-1)).float().mean())
        tol = max(tol, FLOOR_FACTOR * floor_diff)
        least = min(least, floor_agree - FLOOR_AGREEMENT_SLACK)
        out.update(rounding_floor_diff=floor_diff, rounding_floor_top1=floor_agree)
    out.update(tolerance=tol, least_top1_agreement=least, ok=diff <= tol and agree >= least)
    return out
