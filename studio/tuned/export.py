"""Exporting a run: the LoRA adapter, a merged full model (safetensors), or a GGUF file for llama.cpp / Ollama.

- ``adapter``: the adapter folder (config, weights, tokenizer, chat template), without training-only files.
- ``merged``: the base model reloaded in its own 16/32-bit precision, never in 4-bit, with the adapter merged in by
  PEFT's ``merge_and_unload``. A run trained in 4-bit (QLoRA) is merged into the original-precision weights, not into
  the quantized ones; a base checkpoint that is itself stored in 4-bit is dequantized layer by layer first (CUDA).
- ``gguf``: the merged model written with the ``gguf`` package (llama.cpp's own writer) for the Llama, Mistral and
  Qwen2 families: llama.cpp tensor names, Q/K rows permuted for llama.cpp's rotary layout, f16 (or f32) weights with
  f32 norms, the tokenizer (tokens, types, merges, special ids, chat template), plus an Ollama ``Modelfile``.

Every export is loaded back and checked: the adapter by PEFT, the merged model by transformers (its logits against
the adapter model's), the GGUF file by transformers' GGUF reader (logits against the merged model's, and the
tokenizer's ids on a chat prompt). The checks land in ``export.json`` beside the export and in the result.
``python -m studio export RUN_DIR --format adapter|merged|gguf --out PATH`` is the headless way.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.runs import folder as run_folder

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf")
MANIFEST = "export.json"
# files of an adapter folder that only matter for training or resuming
TRAINING_ONLY = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # model_type -> llama.cpp architecture
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."},
         {"role": "assistant", "content": "The capital of France is Paris."}]
Progress = Callable[[str], None] | None


class ExportError(RuntimeError):
    """An export that cannot be made or failed its check; the message says why and what to do."""


@dataclass
class ExportResult:
    format: str
    path: str  # the folder, or the .gguf file
    files: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- where things go -------------------------------------------------------------------------------------------

def _prepare_dir(out: Path, kind: str, overwrite: bool = False) -> Path:
    """A folder to write into: new, empty, or an earlier studio export of ``kind`` (whose own files are replaced
    only with ``overwrite``). Anything the studio did not write is never deleted (studio.safepaths)."""
    from studio import safepaths

    try:
        return safepaths.prepare_folder(out, kind, MANIFEST, overwrite=overwrite)
    except safepaths.PathRefused as e:
        raise ExportError(str(e)) from None


def _write_manifest(folder: Path, result: ExportResult, source: dict[str, Any], name: str = MANIFEST) -> None:
    from studio import safepaths

    data = {"written_by": safepaths.MARKER, **result.as_dict(), "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / name).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


class _Claim:
    """While an export writes into ``folder``: if it fails, the files it wrote are listed in a manifest marked
    incomplete, so a later export may replace them (with overwrite) and nothing else is ever taken for ours."""

    def __init__(self, folder: Path, kind: str, manifest: str = MANIFEST, names: list[str] | None = None):
        self.folder, self.kind, self.manifest, self.names = folder, kind, manifest, names
        self.before = set() if names is not None else {p.name for p in folder.iterdir()}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        try:
            now = {p.name for p in self.folder.iterdir()}
            mine = (set(self.names) & now) if self.names is not None else (now - self.before)
            mine.discard(self.manifest)
            if mine:
                result = ExportResult(self.kind, str(self.folder), sorted(mine), {"complete": False})
                _write_manifest(self.folder, result, {"error": str(exc)}, name=self.manifest)
        except OSError:
            pass
        return False


def default_out(run_dir: str | Path, fmt: str) -> Path:
    return Path(run_dir) / "export" / fmt


# ---- adapter ---------------------------------------------------------------------------------------------------

def export_adapter(src: str | Path, out: str | Path, progress: Progress = None,
                   overwrite: bool = False) -> ExportResult:
    """Copy the run's adapter (final, else newest checkpoint; or the given adapter folder) and load it back."""
    t0 = time.time()
    out = _prepare_dir(Path(out).expanduser().resolve(), "adapter", overwrite)
    with _Claim(out, "adapter"):
        return _export_adapter(src, out, progress, t0)


def _export_adapter(src, out: Path, progress: Progress, t0: float) -> ExportResult:
    from studio.tuned import chat

    choice = chat.resolve_adapter(src)
    if progress:
        progress(f"Copying {choice.label} to {out}…")
    files = []
    for f in sorted(choice.path.iterdir()):
        # ref/ is the frozen copy of the initial adapter that TRL trains against; it is not part of the result
        if f.is_file() and f.name not in TRAINING_ONLY:
            shutil.copy2(f, out / f.name)
            files.append(f.name)
    base_note = portable_base_model(out, run_folder.read_config(choice.run_dir))
    checks = verify_adapter(choice, out, progress)
    checks["base_model"] = base_note
    result = ExportResult("adapter", str(out), files, checks, round(time.time() - t0, 2))
    _write_manifest(out, result, {"run": str(choice.run_dir), "adapter": str(choice.path)})
    return result


def portable_base_model(folder: Path, cfg) -> str:
    """Point the exported ``adapter_config.json`` at a base model another machine can load: PEFT records the path the
    run loaded (a local folder: the bundled model's converted copy, or a download) as ``base_model_name_or_path``.
    A hub model gets its hub id, the bundled model the hub id of the model it was converted from; a local model
    keeps its path, and the returned note says where the adapter needs that model."""
    from studio.config import presets
    from studio.config.run import BUNDLED_MODEL

    f = folder / "adapter_config.json"
    if not f.is_file():
        return "no adapter_config.json"
    data = json.loads(f.read_text(encoding="utf-8"))
    name = cfg.model.name_or_path if cfg is not None else data.get("base_model_name_or_path", "")
    local = Path(name).expanduser()
    if name == BUNDLED_MODEL:
        hub_id = presets.find_model("smollm2-135m").get("hub_id")
        note = (f"{hub_id} (hub id): the studio trained on its bundled copy of that model (dequantized from a 4-bit "
                "GGUF), so the adapter loads anywhere from the hub and behaves near-identically")
    elif not local.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        hub_id, note = name, f"{name} (hub id): loads on any machine with access to the hub"
    else:
        return (f"{name} (a local model, not from the hub): on another machine, copy that model too and set "
                "base_model_name_or_path in adapter_config.json to where it is")
    data["base_model_name_or_path"] = hub_id
    f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return note


def verify_adapter(choice, out: Path, progress: Progress = None) -> dict[str, Any]:
    """Load the exported adapter onto the base model: it must give the same logits as the run's adapter."""
    import torch
    from peft import PeftModel

    from studio.tuned import chat

    if progress:
        progress("Checking the exported adapter loads and acts like the run's…")
    cfg = run_folder.read_config(choice.run_dir)
    base, tok = _load_base_full(cfg)
    ids = _probe_ids(tok)
    with torch.inference_mode():
        base_logits = base(input_ids=ids).logits.float()
        model = PeftModel.from_pretrained(base, str(out), adapter_name="exported")
        model.load_adapter(str(choice.path), adapter_name="run")
        model.set_adapter("exported")
        exported = model(input_ids=ids).logits.float()
        model.set_adapter("run")
        original = model(input_ids=ids).logits.float()
    diff = float((exported - original).abs().max())
    change = float((exported - base_logits).abs().max())
    if diff > 1e-5:
        raise ExportError(f"the exported adapter gives different logits from the run's adapter (max diff {diff:.3g})")
    return {"loads_with_peft": True, "max_logit_diff_vs_run_adapter": diff, "max_logit_change_vs_base": change}


# ---- merged ----------------------------------------------------------------------------------------------------

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


def _load_base_full(cfg, progress: Progress = None):
    """The run's base model in its stored 16/32-bit precision on the CPU (never 4-bit), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.models import load as models

    source = models.resolve_source(cfg.model.name_or_path, progress)
    dtype = _source_dtype(source.path)
    tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    if _is_prequantized(source.path):
        model = _load_dequantized(source.path, dtype, cfg.model.trust_remote_code, progress)
    else:
        if progress:
            progress(f"Loading {cfg.model.name_or_path} in {str(dtype).removeprefix('torch.')} (not 4-bit) to merge…")
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    return model, models.prepare_tokenizer(tok)


def _load_dequantized(path: str, dtype, trust_remote_code: bool, progress: Progress = None):
    """A base checkpoint stored in bitsandbytes 4-bit: load it on the GPU, then dequantize one layer at a time onto
    the CPU so a model larger than the GPU in 16-bit still fits."""
    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        raise ExportError(f"the base model at {path} is stored in 4-bit; dequantizing it needs a CUDA GPU. Export "
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


def _probe_ids(tok):
    import torch

    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(PROBE[0]["content"] + " " + PROBE[1]["content"])["input_ids"]
    return torch.tensor([list(ids)])


def _probe_text(tok) -> str:
    """A chat rendered to text (special tokens included) plus characters that need byte fallback. Compared without
    adding BOS/EOS: transformers' GGUF reader ignores tokenizer.ggml.add_bos_token, which llama.cpp honours."""
    extra = " Ünïcödé ☃ 12×8 = 96."
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(PROBE, tokenize=False) + extra
    return PROBE[0]["content"] + " " + PROBE[1]["content"] + extra


def merged_model(src, progress: Progress = None):
    """(merged model, tokenizer, adapter-model logits on the probe, run config, adapter choice)."""
    import torch
    from peft import PeftModel

    from studio.tuned import chat

    choice = chat.resolve_adapter(src)
    cfg = run_folder.read_config(choice.run_dir)
    base, tok = _load_base_full(cfg, progress)
    if progress:
        progress(f"Merging {choice.label} into the base weights…")
    model = PeftModel.from_pretrained(base, str(choice.path))
    ids = _probe_ids(tok)
    with torch.inference_mode():
        adapter_logits = model(input_ids=ids).logits.float()
    merged = model.merge_and_unload()
    merged.eval()
    return merged, tok, adapter_logits, cfg, choice


def _compare(a, b, dtype_name: str) -> dict[str, Any]:
    """How close two logit tensors are, and whether that is within what the precision allows."""
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    # float32 arithmetic in a different order: tiny; 16-bit weights round each value to ~3 significant digits
    tol = 1e-3 * max(scale, 1.0) if dtype_name == "float32" else 0.02 * max(scale, 1.0)
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "top1_agreement": agree, "tolerance": tol,
            "ok": diff <= tol and agree >= 0.9}


def export_merged(src: str | Path, out: str | Path, progress: Progress = None,
                  overwrite: bool = False) -> ExportResult:
    """Merge the adapter into the 16/32-bit base, save it as safetensors with its tokenizer, load it back."""
    t0 = time.time()
    out = _prepare_dir(Path(out).expanduser().resolve(), "merged", overwrite)
    with _Claim(out, "merged"):
        return _export_merged(src, out, progress, t0)


def _export_merged(src, out: Path, progress: Progress, t0: float) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    merged, tok, adapter_logits, cfg, choice = merged_model(src, progress)
    dtype = next(merged.parameters()).dtype
    if progress:
        progress(f"Saving the merged model to {out}…")
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del merged
    if progress:
        progress("Loading the merged model back to check it…")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    with torch.inference_mode():
        logits = reloaded(input_ids=_probe_ids(tok)).logits.float()
    checks = {"dtype": str(dtype).removeprefix("torch."),
              "vs_adapter_model": _compare(logits, adapter_logits, str(dtype).removeprefix("torch."))}
    if not checks["vs_adapter_model"]["ok"]:
        raise ExportError(f"the merged model's logits differ from the adapter model's beyond tolerance: "
                          f"{checks['vs_adapter_model']}")
    files = sorted(f.name for f in out.iterdir())
    result = ExportResult("merged", str(out), files, checks, round(time.time() - t0, 2))
    _write_manifest(out, result, {"run": str(choice.run_dir), "adapter": str(choice.path),
                                  "base_model": cfg.model.name_or_path})
    return result


# ---- GGUF ------------------------------------------------------------------------------------------------------

def _rope(config) -> tuple[float, dict]:
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
    theta, rope = _rope(config)
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


def export_gguf(src: str | Path, out: str | Path, *, ftype: str = "f16", progress: Progress = None,
                overwrite: bool = False) -> ExportResult:
    """Merge, write ``<run>.gguf`` and a ``Modelfile`` into ``out`` (a folder, or a path ending in .gguf), then load
    the file back with transformers' GGUF reader and compare it with the merged model. A path ending in .gguf
    writes ``NAME.gguf``, ``NAME.Modelfile`` and ``NAME.export.json`` beside the user's other files: none of them
    may exist unless an earlier GGUF export wrote it and ``overwrite`` is set."""
    from studio import safepaths

    t0 = time.time()
    out = Path(out).expanduser().resolve()
    if out.suffix.lower() == ".gguf":
        folder, file_name = out.parent, out.name
        manifest_name = out.stem + ".export.json"
        names = [file_name, f"{out.stem}.Modelfile", manifest_name]
        try:
            safepaths.prepare_files(folder, names, "gguf", manifest_name, overwrite=overwrite)
        except safepaths.PathRefused as e:
            raise ExportError(str(e)) from None
    else:
        folder, file_name, manifest_name, names = _prepare_dir(out, "gguf", overwrite), None, MANIFEST, None
    with _Claim(folder, "gguf", manifest_name, names):
        return _export_gguf(src, folder, file_name, manifest_name, ftype, progress, t0)


def _export_gguf(src, folder: Path, file_name: str | None, manifest_name: str, ftype: str, progress: Progress,
                 t0: float) -> ExportResult:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, tok, adapter_logits, cfg, choice = merged_model(src, progress)
    if merged.config.model_type not in GGUF_ARCHS:
        raise ExportError(f"GGUF export supports the Llama, Mistral and Qwen2 families; this run's model is "
                          f"'{merged.config.model_type}'. Export 'merged' and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py")
    file_name = file_name or f"{cfg.name}.gguf"
    gguf_path = folder / file_name
    ids = _probe_ids(tok)
    with torch.inference_mode():
        merged_logits = merged(input_ids=ids).logits.float()
    if progress:
        progress(f"Writing {gguf_path.name} ({ftype})…")
    write_gguf(merged, tok, gguf_path, ftype=ftype, name=f"{cfg.name} (KTO)")
    dtype = next(merged.parameters()).dtype
    rope_type = _rope(merged.config)[1].get("rope_type", "default")
    del merged
    gc.collect()
    mf = "Modelfile" if manifest_name == MANIFEST else f"{gguf_path.stem}.Modelfile"
    (folder / mf).write_text(modelfile(gguf_path.name, getattr(tok, "chat_template", None)), encoding="utf-8")

    if progress:
        progress("Loading the GGUF file back with transformers to check it…")
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_path.name, dtype=dtype)
    with torch.inference_mode():
        logits = loaded(input_ids=ids).logits.float()
    architecture = loaded.config.model_type
    del loaded
    text = _probe_text(tok)
    same_ids = (gguf_tok(text, add_special_tokens=False)["input_ids"]
                == tok(text, add_special_tokens=False)["input_ids"])
    exact = ftype == "f32" and dtype == torch.float32
    vs_merged = _compare(logits, merged_logits, "float32" if exact else "16-bit")
    checks = {
        "ftype": ftype,
        "loads_with_transformers": True,
        "architecture": architecture,
        "vs_merged_model": vs_merged,
        "vs_adapter_model": _compare(logits, adapter_logits, "float32" if exact else "16-bit"),
        "tokenizer_same_ids": same_ids,
        "modelfile": mf,
    }
    if rope_type == "llama3":
        # transformers' GGUF reader ignores llama.cpp's rope_freqs tensor, so its logits are only a rough check
        checks["note"] = "llama3 rope scaling: the rope_freqs tensor is for llama.cpp; transformers ignores it"
    elif not vs_merged["ok"]:
        raise ExportError(f"the GGUF file, loaded back, does not reproduce the merged model: {vs_merged}")
    if not same_ids:
        raise ExportError("the GGUF file's tokenizer splits a chat prompt differently from the model's tokenizer")
    files = [gguf_path.name, mf, manifest_name]
    result = ExportResult("gguf", str(gguf_path), files, checks, round(time.time() - t0, 2))
    _write_manifest(folder, result, {"run": str(choice.run_dir), "adapter": str(choice.path),
                                     "base_model": cfg.model.name_or_path}, name=manifest_name)
    return result


# ---- one entry point -------------------------------------------------------------------------------------------

def export(src: str | Path, fmt: str, out: str | Path, progress: Progress = None, **kw) -> ExportResult:
    if fmt == "adapter":
        return export_adapter(src, out, progress, **kw)
    if fmt == "merged":
        return export_merged(src, out, progress, **kw)
    if fmt == "gguf":
        return export_gguf(src, out, progress=progress, **kw)
    raise ExportError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")


def cli(args) -> int:
    """``python -m studio export RUN_DIR --format adapter|merged|gguf --out PATH``: prints the result as JSON."""
    from studio.tuned.chat import ChatError
    from studio.config.run import ConfigError
    from studio.models.load import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    try:
        extra = {"ftype": args.gguf_type} if args.format == "gguf" and getattr(args, "gguf_type", None) else {}
        extra["overwrite"] = bool(getattr(args, "overwrite", False))
        result = export(args.run_dir, args.format, args.out,
                        progress=lambda m: print(m, file=sys.stderr, flush=True), **extra)
    except (ExportError, ChatError, ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), indent=2, default=str))
    return 0
