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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.errors import StudioError
from studio.runs import folder as run_folder

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf")
MANIFEST = "export.json"
# files of an adapter folder that only matter for training or resuming
TRAINING_ONLY = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."},
         {"role": "assistant", "content": "The capital of France is Paris."}]
Progress = Callable[[str], None] | None


class ExportError(StudioError, RuntimeError):
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

    from studio.models import full_precision

    if progress:
        progress("Checking the exported adapter loads and acts like the run's…")
    cfg = run_folder.read_config(choice.run_dir)
    base, tok = full_precision.load_base_full(cfg)
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

    from studio.models import full_precision
    from studio.tuned import chat

    choice = chat.resolve_adapter(src)
    cfg = run_folder.read_config(choice.run_dir)
    base, tok = full_precision.load_base_full(cfg, progress)
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

    from studio.tuned.gguf_writer import GGUF_ARCHS, modelfile, rope_parameters, write_gguf

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
    rope_type = rope_parameters(merged.config)[1].get("rope_type", "default")
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
