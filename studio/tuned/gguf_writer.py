"""Writing a merged Llama / Mistral / Qwen2 model as a GGUF file for llama.cpp, and the Ollama Modelfile beside it.

Written with the ``gguf`` package (llama.cpp's own writer): llama.cpp tensor names, Q/K rows permuted for llama.cpp's
rotary layout, f16 (or f32) weights with f32 norms, the tokenizer (tokens, types, merges, special ids, chat
template). ``studio.tuned.export`` merges the adapter, calls ``write_gguf`` and checks the file loads back.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from studio.tuned.export import ExportError

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


def write_gguf(model, tokenizer, path: str | Path, *, ftype: str = "f16", name: str | None = None) -> Path:
    """Write a loaded (merged) Llama / Mistral / Qwen2 model and its tokenizer as a GGUF file."""
    import gguf
    import numpy as np
    import torch

    path = Path(path)
    config = model.config
    model_type = config.model_type
    if model_type not in GGUF_ARCHS:
        raise ExportError(f"GGUF export supports the Llama, Mistral and Qwen2 families; this model is "
                          f"'{model_type}'. Export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")
    if ftype not in ("f16", "f32"):
        raise ExportError("GGUF tensor type must be 'f16' or 'f32'")
    arch = GGUF_ARCHS[model_type]
    n_layer = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta, rope = rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"rope scaling '{rope_type}' is not supported by the GGUF export: export 'merged' and "
                          "convert it with llama.cpp's convert_hf_to_gguf.py")
    n_vocab = max(int(config.vocab_size), len(tokenizer))

    w = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    w.add_name(name or path.stem)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(n_layer))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(theta)
    w.add_vocab_size(n_vocab)
    if arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(str(Path(tmp) / "config.json"))
        kind = _tokenizer_kind(Path(tmp))
        tokens, scores, types = _vocab(tokenizer, n_vocab, kind)
        w.add_tokenizer_model(kind)
        if kind == "gpt2":
            w.add_tokenizer_pre(_pre_tokenizer(tokenizer, model_type))
        else:
            w.add_tokenizer_pre("default")
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

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ExportError(f"no llama.cpp name for tensor {hf_name}: this model has layers the GGUF export does "
                              "not know; export 'merged' and convert it with llama.cpp's convert_hf_to_gguf.py")
        data = tensor.detach().to("cpu", torch.float32)
        if arch == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
            data = _permute_for_llama_cpp(data, n_head if ".q_proj." in hf_name else n_kv)
        arr = data.numpy()
        # llama.cpp keeps 1-D tensors (norms, biases) in f32 whatever the file type
        arr = arr.astype(np.float16) if (ftype == "f16" and arr.ndim > 1) else arr.astype(np.float32)
        w.add_tensor(gg_name, arr)
    if rope_type == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     _llama3_rope_factors(theta, int(head_dim), rope))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- Ollama ----------------------------------------------------------------------------------------------------

_CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
_LLAMA3 = ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
_INST = ("{{- range $i, $m := .Messages }}{{- if eq $m.Role \"user\" }}[INST] "
         "{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]"
         "{{- else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>{{- end }}{{- end }}")


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """The Modelfile TEMPLATE (Go template syntax) and stop words matching a Jinja chat template's family."""
    t = chat_template or ""
    if "<|im_start|>" in t:
        return _CHATML, ["<|im_start|>", "<|im_end|>"]
    if "<|start_header_id|>" in t:
        return _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    if "[INST]" in t:
        return _INST, ["[INST]", "[/INST]", "</s>"]
    return None, []


def modelfile(gguf_name: str, chat_template: str | None, system: str | None = None) -> str:
    template, stops = ollama_template(chat_template)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat template has no known Ollama equivalent; Ollama reads the GGUF's",
                  "# tokenizer.chat_template when it recognises it. Write a TEMPLATE here otherwise.", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"
