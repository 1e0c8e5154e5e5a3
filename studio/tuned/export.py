"""Exporting a run: the LoRA adapter, a merged full model (safetensors), a GGUF file, or a GGUF LoRA adapter.

- ``adapter``: the adapter folder (config, weights, tokenizer, chat template), without training-only files.
- ``merged``: the adapter merged into the base weights one tensor at a time in float32 (``studio.tuned.merge``),
  saved in the base's own 16/32-bit dtype. A run trained in 4-bit (QLoRA) on a 16-bit checkpoint is merged into the
  16-bit weights; a checkpoint stored in 4-bit (``unsloth/*-bnb-4bit``) is dequantized exactly as bitsandbytes'
  kernel does and saved in bf16. An 8B model merges in CPU RAM, on a machine without a GPU too.
- ``gguf``: the merged model written straight into a GGUF file for llama.cpp / Ollama (Llama, Mistral, Qwen2) in
  the type asked for (``studio.tuned.gguf_quant``: q4_k_m, q8_0, q4_0, f16, f32), with an Ollama ``Modelfile``.
- ``gguf-adapter``: the LoRA alone as a llama.cpp GGUF adapter (tens of MB), with a ``Modelfile`` whose ``FROM`` is
  the base model and ``ADAPTER`` the file.

Every export is loaded back and checked. The reference is the model the user trained and chats with: the adapter on
the base as stored (a 4-bit base through the dequantized matrices its kernel uses), computed in float32. The merged
model is compared with it on a chat prompt (logits, in float32 arithmetic, so only the saved weights' precision
counts); a GGUF file by ``gguf``'s reader (every tensor of a small model, a sample of a large one, against the merged
weights, within its type's error), by transformers' GGUF reader (logits, where the model is small enough to load in
float32 twice) and by llama.cpp when it is installed; a GGUF adapter against the PEFT adapter's updates. The checks
land in ``export.json`` beside the export and in the result. ``python -m studio export RUN_DIR --format FORMAT``
is the headless way; ``estimate`` says how big an export will be before it is written.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.models import cpu_threads
from studio.runs import folder as run_folder
from studio.tuned import reference
from studio.tuned.merge import ExportError

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf", "gguf-adapter")
MANIFEST = "export.json"
# files of an adapter folder that only matter for training or resuming
TRAINING_ONLY = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
Progress = Callable[[str], None] | None


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

    # each file with its size and SHA-256: a later replace deletes only files that still match (safepaths)
    data = {"written_by": safepaths.MARKER, **result.as_dict(), "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "hashes": safepaths.file_records(folder, [f for f in result.files if f != name])}
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
    ids = reference.probe_ids(tok).to(base.device)
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

def export_merged(src: str | Path, out: str | Path, progress: Progress = None,
                  overwrite: bool = False) -> ExportResult:
    """Merge the adapter into the base in float32, save safetensors with the tokenizer, load it back and check."""
    t0 = time.time()
    out = _prepare_dir(Path(out).expanduser().resolve(), "merged", overwrite)
    with _Claim(out, "merged"):
        return _export_merged(src, out, progress, t0)


def _export_merged(src, out: Path, progress: Progress, t0: float) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    from studio.models import full_precision
    from studio.tuned.merge import write_config, write_safetensors

    run = reference.run_source(src, progress)
    merged = reference.merged_weights(run)
    dtype = full_precision.merged_dtype(run.base_path)
    dtype_name = str(dtype).removeprefix("torch.")
    if progress:
        stored = "dequantized from its 4-bit checkpoint, " if run.quantized else ""
        progress(f"Merging {run.choice.label} into {run.cfg.model.name_or_path} ({stored}in float32, saved in "
                 f"{dtype_name}, about {estimate(run, 'merged')['bytes'] / 1e9:.2f} GB) to {out}…")
    write_safetensors(merged.items(), out, dtype, len(merged.names()), progress)
    write_config(run.base_path, out, dtype)
    tok = run.tokenizer()
    tok.save_pretrained(out)
    del merged
    ids = reference.probe_ids(tok)
    want, floor = reference.reference_logits(run, ids, progress, rounded_to=dtype)
    if progress:
        progress("Loading the merged model back to check it…")
    device = full_precision.check_device(full_precision.checkpoint_bytes(out), run.cfg.model.gpu_memory_gib)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map={"": device},
                                                    trust_remote_code=run.cfg.model.trust_remote_code)
    with torch.inference_mode(), full_precision.float32_compute(reloaded):
        got = reloaded(input_ids=ids.to(device)).logits.float().cpu()
    del reloaded
    if device == "cuda":
        torch.cuda.empty_cache()
    precision = "float32" if dtype_name == "float32" else "16-bit"
    checks = {"dtype": dtype_name, "base_stored_in_4bit": run.quantized,
              "vs_adapter_model": reference.compare(got, want, precision, floor)}
    if not checks["vs_adapter_model"]["ok"]:
        raise ExportError(f"the merged model's logits differ from the trained model's beyond tolerance: "
                          f"{checks['vs_adapter_model']}")
    files = sorted(f.name for f in out.iterdir() if f.name != MANIFEST)
    result = ExportResult("merged", str(out), files, checks, round(time.time() - t0, 2))
    _write_manifest(out, result, {"run": str(run.choice.run_dir), "adapter": str(run.choice.path),
                                  "base_model": run.cfg.model.name_or_path})
    return result


# ---- GGUF: a merged model, or the LoRA alone -------------------------------------------------------------------

def _gguf_target(out: Path, kind: str, overwrite: bool) -> tuple[Path, str | None, str, str, list[str] | None]:
    """(folder, file name or None, manifest name, Modelfile name, names claimed) for a GGUF export into a folder,
    or to a path ending in .gguf: then ``NAME.gguf``, ``NAME.Modelfile`` and ``NAME.export.json`` go beside the
    user's other files, none of which may exist unless an earlier export of this kind wrote it (and overwrite)."""
    from studio import safepaths

    if out.suffix.lower() == ".gguf":
        folder, file_name = out.parent, out.name
        manifest_name, mf = out.stem + ".export.json", f"{out.stem}.Modelfile"
        names = [file_name, mf, manifest_name]
        try:
            safepaths.prepare_files(folder, names, kind, manifest_name, overwrite=overwrite)
        except safepaths.PathRefused as e:
            raise ExportError(str(e)) from None
        return folder, file_name, manifest_name, mf, names
    return _prepare_dir(out, kind, overwrite), None, MANIFEST, "Modelfile", None


def export_gguf(src: str | Path, out: str | Path, *, gguf_type: str = "q4_k_m", progress: Progress = None,
                overwrite: bool = False, ftype: str | None = None) -> ExportResult:
    """Merge and write ``<run>-<TYPE>.gguf`` and a ``Modelfile`` into ``out`` (a folder, or a path ending in .gguf),
    then read the file back and check it. ``ftype`` is the older name of ``gguf_type``."""
    from studio.tuned import export_gguf as work

    t0 = time.time()
    gguf_type = ftype or gguf_type
    work.resolve_type(gguf_type)  # an unknown type is refused before anything is written
    folder, file_name, manifest_name, mf, names = _gguf_target(Path(out).expanduser().resolve(), "gguf", overwrite)
    with _Claim(folder, "gguf", manifest_name, names):
        run = reference.run_source(src, progress)
        path, files, checks = work.gguf_file(run, folder, file_name, gguf_type, mf, progress)
        result = ExportResult("gguf", str(path), files + [manifest_name], checks, round(time.time() - t0, 2))
        _write_manifest(folder, result, {"run": str(run.choice.run_dir), "adapter": str(run.choice.path),
                                         "base_model": run.cfg.model.name_or_path, "gguf_type": gguf_type},
                        name=manifest_name)
        return result


def export_gguf_adapter(src: str | Path, out: str | Path, *, progress: Progress = None, overwrite: bool = False,
                        base_gguf: str | None = None) -> ExportResult:
    """Write the LoRA as ``<run>-lora-F16.gguf`` (a llama.cpp adapter) and a ``Modelfile`` (FROM the base model,
    ADAPTER the file) into ``out`` (a folder, or a path ending in .gguf); read it back and check it."""
    from studio.tuned import export_gguf as work

    t0 = time.time()
    folder, file_name, manifest_name, mf, names = _gguf_target(Path(out).expanduser().resolve(), "gguf-adapter",
                                                               overwrite)
    with _Claim(folder, "gguf-adapter", manifest_name, names):
        run = reference.run_source(src, progress)
        path, files, checks = work.gguf_adapter(run, folder, file_name, mf, progress, base_gguf)
        result = ExportResult("gguf-adapter", str(path), files + [manifest_name], checks, round(time.time() - t0, 2))
        _write_manifest(folder, result, {"run": str(run.choice.run_dir), "adapter": str(run.choice.path),
                                         "base_model": run.cfg.model.name_or_path}, name=manifest_name)
        return result


# ---- before and after ------------------------------------------------------------------------------------------

def estimate(src, fmt: str, gguf_type: str = "q4_k_m") -> dict[str, Any]:
    """How big an export will be, before writing it (from the checkpoint's shapes: nothing is loaded or
    downloaded; a base model not downloaded yet raises ModelLoadError)."""
    import math

    from studio.models.full_precision import BaseWeights, merged_dtype
    from studio.tuned import export_gguf as work

    from studio.tuned import chat

    if fmt == "adapter":
        folder = src.choice.path if isinstance(src, reference.RunSource) else chat.resolve_adapter(src).path
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name not in TRAINING_ONLY)
        return {"format": fmt, "bytes": int(size), "text": f"about {_human(size)}: the LoRA adapter folder"}
    run = src if isinstance(src, reference.RunSource) else reference.run_source(src, download=False)
    if fmt == "merged":
        base = BaseWeights(run.base_path, device="cpu")
        width = {"float32": 4}.get(str(merged_dtype(run.base_path)).removeprefix("torch."), 2)
        size = width * sum(math.prod(base.shape(n)) for n in base.names())
        text = "the merged model (safetensors)"
    elif fmt in ("gguf", "gguf-adapter"):
        size = work.estimate_bytes(run, fmt, gguf_type)
        written, note = work.resolve_type(gguf_type) if fmt == "gguf" else ("f16", None)
        text = (f"GGUF {written}" + (" (estimated)" if written == "q4_k_m" else "")
                if fmt == "gguf" else "GGUF LoRA adapter (f16)") + (f" — {note}" if note else "")
    else:
        raise ExportError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    return {"format": fmt, "bytes": int(size), "text": f"about {_human(size)}: {text}"}


def _human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@cpu_threads.released
def export(src: str | Path, fmt: str, out: str | Path, progress: Progress = None, **kw) -> ExportResult:
    if fmt == "adapter":
        return export_adapter(src, out, progress, **kw)
    if fmt == "merged":
        return export_merged(src, out, progress, **kw)
    if fmt == "gguf":
        return export_gguf(src, out, progress=progress, **kw)
    if fmt == "gguf-adapter":
        return export_gguf_adapter(src, out, progress=progress, **kw)
    raise ExportError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
