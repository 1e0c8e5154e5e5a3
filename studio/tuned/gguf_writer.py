"""Writing Llama / Mistral / Qwen2 models as GGUF files for llama.cpp and Ollama: a merged model, or a LoRA adapter.

Written with the ``gguf`` package (llama.cpp's own writer) the way llama.cpp's converters write them: llama.cpp
tensor names, Q/K rows permuted for llama.cpp's rotary layout, matrices in the chosen type with f32 norms
(``studio.tuned.gguf_quant``), the tokenizer (tokens, types, merges, special ids, chat template). Tensors stream from
their source (a merged model tensor by tensor, or a loaded model) into the file: the header and tensor table are
written first, then each tensor as it is made, so the model never exists twice in memory. A LoRA adapter becomes a
llama.cpp adapter file (``general.type`` adapter, ``adapter.type`` lora, ``adapter.lora.alpha``,
``<tensor>.lora_a`` / ``.lora_b``). ``studio.tuned.export`` calls these and checks what they wrote.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from studio.tuned.merge import ExportError

GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # model_type -> llama.cpp architecture


# ---- GGUF ------------------------------------------------------------------------------------------------------

def rope_parameters(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _permute_for_llama_cpp(w, n_head: int):
    """HF stores each head's rotary pairs as two halves; llama.cpp's 'llama' rope wants them interleaved."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _unpermute_from_llama_cpp(w, n_head: int):
    """The inverse of ``_permute_for_llama_cpp``: llama.cpp's interleaved rotary pairs back to HF's two halves."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama3_rope_factors(theta: float, head_dim: int, params: dict):
    """Per-frequency divisors of Llama 3.1+ rope scaling, stored as llama.cpp's ``rope_freqs`` tensor."""
    import math

    import numpy as np

    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _pre_tokenizer(tok, model_type: str) -> str:
    """llama.cpp's pre-tokenizer name (it picks the regex that splits text before BPE)."""
    vocab = tok.get_vocab()
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if "<|im_start|>" in vocab and "<jupyter_code>" in vocab:
        return "smollm"
    return "default"


def _tokenizer_kind(tok_dir: Path) -> str:
    """'gpt2' for byte-level BPE (Llama 3, Qwen2, SmolLM), 'llama' for SentencePiece-style BPE (Llama 2, Mistral)."""
    try:
        tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ExportError("GGUF export needs the model's fast tokenizer (tokenizer.json)") from None
    if json.dumps(tj.get("pre_tokenizer")).find("ByteLevel") >= 0:
        return "gpt2"
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(f"GGUF export supports byte-level BPE and SentencePiece-BPE tokenizers; this one is "
                      f"{model.get('type')}: export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")


def _vocab(tok, n_vocab: int, kind: str):
    """Tokens, scores and llama.cpp token types for ids 0..n_vocab-1 (ids the tokenizer lacks become unused pads)."""
    import re

    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            if kind == "llama" and not added[i].special:
                t = t.replace("\u2581", " ")
            scores.append(0.0)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        elif kind == "llama" and t == tok.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            # SentencePiece BPE ranks pieces by score (higher merges first); vocabulary order is that rank
            scores.append(-float(i) if kind == "llama" else 0.0)
        tokens.append(t)
    return tokens, scores, types




# ---- layout: Hugging Face names and shapes -> llama.cpp's ----------------------------------------------------------

@dataclass
class Layout:
    """How a Hugging Face Llama / Mistral / Qwen2 model maps onto llama.cpp's architecture and tensor names."""

    arch: str
    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    theta: float
    rope: dict
    rope_type: str
    tied: bool
    names: object

    def gguf_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a tensor; None for tensors llama.cpp does without (rotary caches, a tied head)."""
        if hf_name.endswith("rotary_emb.inv_freq") or (self.tied and hf_name == "lm_head.weight"):
            return None
        gg = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise ExportError(f"no llama.cpp name for tensor {hf_name}: this model has layers the GGUF export does "
                              "not know; export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")
        return gg

    def heads_to_permute(self, hf_name: str) -> int | None:
        """Q and K rows are reordered for llama.cpp's 'llama' rope (interleaved pairs): the head count, else None."""
        if self.arch != "llama":
            return None
        if ".self_attn.q_proj." in hf_name:
            return self.n_head
        if ".self_attn.k_proj." in hf_name:
            return self.n_kv
        return None

    def permute(self, hf_name: str, t):
        heads = self.heads_to_permute(hf_name)
        return t if heads is None else _permute_for_llama_cpp(t, heads)

    def unpermute(self, hf_name: str, t):
        heads = self.heads_to_permute(hf_name)
        return t if heads is None else _unpermute_from_llama_cpp(t, heads)


def layout(config) -> Layout:
    import gguf

    model_type = config.model_type
    if model_type not in GGUF_ARCHS:
        raise ExportError(f"GGUF export supports the Llama, Mistral and Qwen2 families; this model is "
                          f"'{model_type}'. Export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = GGUF_ARCHS[model_type]
    n_head = int(config.num_attention_heads)
    theta, rope = rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"rope scaling '{rope_type}' is not supported by the GGUF export: export 'merged' and "
                          "convert it with llama.cpp's convert_hf_to_gguf.py")
    n_layer = int(config.num_hidden_layers)
    return Layout(arch=arch, n_layer=n_layer, n_head=n_head,
                  n_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
                  head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // n_head),
                  theta=theta, rope=rope, rope_type=rope_type,
                  tied=bool(getattr(config, "tie_word_embeddings", False)),
                  names=gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                                 n_layer))


class ModelWeights:
    """A loaded model's tensors in the interface ``BaseWeights`` / ``MergedWeights`` have."""

    def __init__(self, model):
        self._sd = model.state_dict()

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def get(self, name: str):
        import torch

        return self._sd[name].detach().to("cpu", torch.float32)


@dataclass
class Planned:
    hf_name: str | None  # None: a tensor llama.cpp needs that the model has no weight for (llama3 rope_freqs)
    gg_name: str
    shape: tuple[int, ...]
    qtype: object


def plan(weights, config, gguf_type: str) -> tuple[Layout, list[Planned]]:
    """Every tensor the file will hold, with its llama.cpp name, shape and type, in writing order."""
    import gguf

    from studio.tuned import gguf_quant

    lay = layout(config)
    out = []
    for hf_name in weights.names():
        gg = lay.gguf_name(hf_name)
        if gg is None:
            continue
        shape = tuple(weights.shape(hf_name))
        out.append(Planned(hf_name, gg, shape, gguf_quant.tensor_type(gg, shape, gguf_type, lay.n_layer, lay.tied)))
    if lay.rope_type == "llama3":
        out.append(Planned(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (lay.head_dim // 2,),
                           gguf.GGMLQuantizationType.F32))
    return lay, out


def planned_bytes(planned: list[Planned], gguf_type: str, n_layer: int) -> int:
    """The tensor data's size in the finished file (for q4_k_m: llama-quantize's result, estimated)."""
    from studio.tuned import gguf_quant

    if gguf_type == "q4_k_m":
        return int(sum(gguf_quant.q4_k_m_bytes(p.gg_name, p.shape, n_layer) for p in planned))
    return sum(gguf_quant.nbytes(p.shape, p.qtype) for p in planned)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q4_k_m": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}


def _add_model_metadata(w, config, lay: Layout, n_vocab: int) -> None:
    import gguf

    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(lay.n_layer)
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(lay.n_head)
    w.add_head_count_kv(lay.n_kv)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(lay.theta)
    w.add_vocab_size(n_vocab)
    if lay.arch == "llama":
        w.add_rope_dimension_count(lay.head_dim)
    if lay.head_dim != config.hidden_size // lay.n_head:
        w.add_key_length(lay.head_dim)
        w.add_value_length(lay.head_dim)
    if lay.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(lay.rope["factor"]))


def _add_tokenizer(w, tokenizer, config, n_vocab: int) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(str(Path(tmp) / "config.json"))
        kind = _tokenizer_kind(Path(tmp))
        tokens, scores, types = _vocab(tokenizer, n_vocab, kind)
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(_pre_tokenizer(tokenizer, config.model_type) if kind == "gpt2" else "default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=n_vocab)
        # say explicitly whether llama.cpp must add BOS/EOS: what the tokenizer itself does with plain text
        probe = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
        # SentencePiece prepends a space to the text; byte-level BPE does not
        w.add_add_space_prefix(kind == "llama")
        special.add_to_gguf(w, quiet=True)


def write_gguf_weights(weights, config, tokenizer, path: str | Path, *, gguf_type: str = "f16",
                       name: str | None = None, progress=None, workers: int | None = None) -> dict:
    """Write a model's tensors (``weights``: names/shape/get, e.g. the merged model tensor by tensor) and its
    tokenizer as a GGUF file of ``gguf_type`` (f32, f16, q8_0, q4_0; q4_k_m writes the f16 file llama-quantize
    starts from). Returns what was written: bytes, tensor count, and how many tensors of each type."""
    import time

    import gguf
    import numpy as np

    from studio.tuned import gguf_quant

    path = Path(path)
    lay, planned = plan(weights, config, gguf_type)
    n_vocab = max(int(config.vocab_size), len(tokenizer))
    w = gguf.GGUFWriter(str(path), lay.arch)
    w.add_name(name or path.stem)
    _add_model_metadata(w, config, lay, n_vocab)
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, config, n_vocab)
    Q = gguf.GGMLQuantizationType
    for p in planned:
        size = gguf_quant.nbytes(p.shape, p.qtype)
        if p.qtype in (Q.F32, Q.F16):
            w.add_tensor_info(p.gg_name, p.shape, np.float32 if p.qtype == Q.F32 else np.float16, size)
        else:
            w.add_tensor_info(p.gg_name, gguf.quant_shape_to_byte_shape(p.shape, p.qtype), np.uint8, size,
                              raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(gguf_quant.nbytes(p.shape, p.qtype) for p in planned)
    quantized = sum(int(np.prod(p.shape)) for p in planned if p.qtype not in (Q.F32, Q.F16))

    def arrays():
        for p in planned:
            if p.hf_name is None:
                yield p.qtype, _llama3_rope_factors(lay.theta, lay.head_dim, lay.rope)
            else:
                yield p.qtype, gguf_quant.to_numpy(lay.permute(p.hf_name, weights.get(p.hf_name)), p.qtype)

    t0, written = time.time(), 0
    for i, arr in enumerate(gguf_quant.quantized_stream(arrays(), workers, quantized)):
        w.write_tensor_data(arr)
        written += arr.nbytes
        if progress and (i % 16 == 15 or i == len(planned) - 1):
            progress(f"Wrote {i + 1}/{len(planned)} tensors of {path.name}: {written / 1e9:.2f} of "
                     f"{total / 1e9:.2f} GB ({time.time() - t0:.0f} s)")
    w.close()
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return {"bytes": path.stat().st_size, "tensors": len(planned), "types": counts}


def write_gguf(model, tokenizer, path: str | Path, *, ftype: str = "f16", name: str | None = None) -> Path:
    """Write a loaded Llama / Mistral / Qwen2 model and its tokenizer as a GGUF file of type ``ftype``."""
    from studio.tuned import gguf_quant

    if ftype not in gguf_quant.TYPES or ftype == "q4_k_m":
        raise ExportError(f"GGUF tensor type must be one of f32, f16, q8_0, q4_0, not '{ftype}'")
    write_gguf_weights(ModelWeights(model), model.config, tokenizer, path, gguf_type=ftype, name=name)
    return Path(path)


# ---- a LoRA adapter as a llama.cpp adapter file ----------------------------------------------------------------

def lora_tensors(lora, config, dtype: str = "f16"):
    """(layout, alpha, [(name, array)]) of a llama.cpp LoRA adapter: ``<tensor>.lora_a`` (r x in) and ``.lora_b``
    (out x r, its rows permuted like the weight's), scaled so that llama.cpp's alpha / r gives each pair PEFT's
    scale."""
    import numpy as np
    import torch

    lay = layout(config)
    if lora.replaced:
        raise ExportError("the run trained biases too (lora.bias is not 'none'), which a llama.cpp LoRA adapter "
                          "cannot carry: export 'gguf' (merged) instead")
    if not lora.pairs:
        raise ExportError("the adapter holds no LoRA matrices")
    first = next(iter(lora.pairs.values()))
    alpha = first[2] * first[0].shape[0]  # llama.cpp scales by alpha / rank
    np_dtype = np.float16 if dtype == "f16" else np.float32
    out = []
    for hf_name, (a, b, scale) in lora.pairs.items():
        gg = lay.gguf_name(hf_name)
        if gg is None:
            raise ExportError(f"the adapter changes {hf_name}, which llama.cpp does not load: export 'gguf' (merged)")
        b = b.to(torch.float32) * (scale * a.shape[0] / alpha)  # 1.0 unless ranks or alphas differ per layer
        out.append((gg + ".lora_a", a.to(torch.float32).numpy().astype(np_dtype)))
        out.append((gg + ".lora_b", lay.permute(hf_name, b).numpy().astype(np_dtype)))
    return lay, float(alpha), out


def write_lora_gguf(lora, config, path: str | Path, *, name: str | None = None, dtype: str = "f16") -> dict:
    """Write a PEFT LoRA adapter (``studio.tuned.merge.read_lora``) as a llama.cpp GGUF LoRA adapter."""
    import gguf

    path = Path(path)
    lay, alpha, tensors = lora_tensors(lora, config, dtype)
    w = gguf.GGUFWriter(str(path), lay.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name or path.stem)
    for gg_name, arr in tensors:
        w.add_tensor(gg_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"bytes": path.stat().st_size, "tensors": len(tensors), "alpha": alpha,
            "rank": int(next(iter(lora.pairs.values()))[0].shape[0])}
