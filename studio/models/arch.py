"""A model's architecture from its config.json alone (no weights loaded): the shapes that decide memory and size.

The config comes from a model preset's built-in copy, a local folder's config.json, the HF cache, a GGUF header or,
for hub ids not in the cache, a download of config.json alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from studio.errors import UsageError


class EstimateError(UsageError, ValueError):
    """An estimate that cannot be made (unknown architecture, missing config); the message says what to do."""


# bitsandbytes NF4 with double quantization: 4-bit codes + an 8-bit absmax per 64 weights + an fp32 absmax per 256
# of those blocks (the 4-bit paths' linear layers on the GPU, and on disk in a pre-quantized "bnb-4bit" repo)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[str(name).removeprefix("torch.")]


# ---- shapes --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """The shapes that decide memory, from a config.json dict."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int
    attention_bias: bool = False
    fused_qkv: bool = False  # Phi-3: one qkv_proj, one gate_up_proj
    name: str = ""

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "") -> "Arch":
        text = cfg.get("text_config") or cfg
        if not isinstance(text, dict):
            text = cfg
        try:
            hidden = int(text.get("hidden_size") or text.get("n_embd") or text["d_model"])
            layers = int(text.get("num_hidden_layers") or text.get("n_layer") or text["num_layers"])
            heads = int(text.get("num_attention_heads") or text["n_head"])
            vocab = int(text["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise EstimateError(f"config of {name or 'the model'} lacks {e}: not a decoder-only language model config")
        model_type = str(text.get("model_type") or cfg.get("model_type") or "")
        head_dim = int(text.get("head_dim") or hidden // heads)
        inter = int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden)
        return cls(
            model_type=model_type, hidden=hidden, intermediate=inter, layers=layers, heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim, vocab=vocab,
            tied=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
            max_positions=int(text.get("max_position_embeddings") or 4096),
            attention_bias=bool(text.get("attention_bias", model_type in ("qwen2",))),
            fused_qkv=model_type in ("phi3", "phi4", "phimoe"), name=name,
        )

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name, in, out) of the linear layers of one decoder block."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused_qkv:
            return [("qkv_proj", h, q + 2 * kv), ("o_proj", q, h), ("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for _, a, b in self.linears())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def unquantized_params(self, include_input_embedding: bool = True) -> int:
        """Embedding (when on the GPU), untied LM head, norms and attention biases: never quantized."""
        emb = self.embedding_params()
        n = (emb if include_input_embedding else 0) + (0 if self.tied else emb)
        n += (2 * self.layers + 1) * self.hidden
        if self.attention_bias:
            n += self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim
        return n

    def total_params(self) -> int:
        return self.linear_params() + self.unquantized_params()

    def stored_bytes(self, four_bit: bool = False, param_bytes: int = 2) -> float:
        """The weights as a checkpoint stores them: every weight at ``param_bytes``, or (``four_bit``: a
        pre-quantized bitsandbytes repo) the decoder's linear layers in NF4 with double quantization and the
        embeddings, LM head and norms at ``param_bytes``."""
        if four_bit:
            return self.linear_params() * NF4_BYTES_PER_PARAM + self.unquantized_params() * param_bytes
        return self.total_params() * param_bytes

    def lora_params(self, rank: int, targets: str | Iterable[str] = "all-linear") -> int:
        wanted = None if targets == "all-linear" else set(targets)
        per_layer = sum(rank * (a + b) for n, a, b in self.linears() if wanted is None or n in wanted)
        return self.layers * per_layer

    def label(self) -> str:
        return self.name or self.model_type


# ---- reading a model's config ---------------------------------------------------------------------------------

def model_config(name_or_path: str, fetch: bool = True) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) for a preset key, hub id, local folder, config.json, GGUF file or the
    bundled model, without loading weights. Hub ids not in the presets are read from the local HF cache, else
    (``fetch``) their config.json alone is downloaded."""
    from studio.config import presets

    preset = presets.find_model(name_or_path)
    if preset is not None and preset.get("config"):
        return dict(preset.get("config")), f"preset {preset.key}"
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise EstimateError(f"{p} holds no config.json: point at a model folder")
        return json.loads(f.read_text(encoding="utf-8")), str(f)
    if p.is_file() and p.suffix.lower() == ".json":
        return json.loads(p.read_text(encoding="utf-8")), str(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return dict(load_gguf_checkpoint(str(p), return_tensors=False)["config"]), str(p)
    if p.suffix.lower() in (".gguf", ".json") or name_or_path.startswith(("/", ".", "~")):
        raise EstimateError(f"{name_or_path} does not exist")
    if name_or_path.count("/") != 1:
        raise EstimateError(f"'{name_or_path}' is neither a model preset, a local folder/.gguf file nor a hub id")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8")), cached
    from studio.models import hub

    if not fetch or hub.offline():
        raise EstimateError(f"{name_or_path} is not downloaded yet, so its architecture is unknown: download it "
                            "(Model & preset tab) or pick a model preset")
    try:
        f = hf_hub_download(name_or_path, "config.json")
    except Exception as e:  # offline, gated or unknown: say which
        raise EstimateError(
            f"cannot read {name_or_path}'s config.json ({type(e).__name__}): download the model first, or pick a "
            "model preset") from None
    return json.loads(Path(f).read_text(encoding="utf-8")), f


def arch_for(name_or_path: str, fetch: bool = True) -> Arch:
    from studio.config.run import BUNDLED_MODEL

    if name_or_path == BUNDLED_MODEL:
        name_or_path = "smollm2-135m"
    cfg, _ = model_config(name_or_path, fetch)
    local = Path(name_or_path).expanduser()
    return Arch.from_config(cfg, name=local.name if local.exists() else name_or_path)
