"""The GGUF exports' work: a merged model in the GGUF type asked for, or the LoRA alone as a GGUF adapter, each with
its Ollama Modelfile, read back and checked. ``studio.tuned.export`` gives them their folder and records the result.

A merged GGUF streams from the merge (``studio.tuned.merge.MergedWeights``) into the file, quantized on every core
(``studio.tuned.gguf_quant``); ``q4_k_m`` writes an f16 file first, which llama.cpp's ``llama-quantize`` turns into
Q4_K_M and which is deleted afterwards (without llama-quantize the export writes ``q4_0`` and says so).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

from studio.tuned import gguf_quant, reference
from studio.tuned.merge import ExportError

Progress = Callable[[str], None] | None
LOGITS_UP_TO = 1_500_000_000  # parameters: larger models skip transformers' GGUF reader (it loads them in float32)


def resolve_type(gguf_type: str) -> tuple[str, str | None]:
    """The type that will be written and, when it differs from the one asked for, why."""
    if gguf_type not in gguf_quant.TYPES:
        raise ExportError(f"unknown GGUF type '{gguf_type}': use one of {', '.join(gguf_quant.TYPES)}")
    if gguf_type == "q4_k_m" and gguf_quant.llama_tool("llama-quantize") is None:
        return "q4_0", (f"llama.cpp's llama-quantize was not found (on PATH or in ${gguf_quant.LLAMA_CPP_ENV}), so "
                        "this is q4_0, the best 4-bit mix the gguf package writes; install llama.cpp for Q4_K_M")
    return gguf_type, None


def default_name(run, gguf_type: str) -> str:
    return f"{run.cfg.name}-{gguf_type.upper()}.gguf"


def estimate_bytes(run, fmt: str, gguf_type: str = gguf_quant.DEFAULT_TYPE) -> int:
    """How many bytes the GGUF export will write (q4_k_m: llama-quantize's result, estimated), from the shapes."""
    from studio.models.full_precision import BaseWeights
    from studio.tuned.gguf_writer import layout, lora_tensors, plan, planned_bytes
    from studio.tuned.merge import read_lora

    if fmt == "gguf-adapter":
        return sum(a.nbytes for _, a in lora_tensors(read_lora(run.choice.path), run.config())[2])
    written, _ = resolve_type(gguf_type)
    config = run.config()
    lay, planned = plan(BaseWeights(run.base_path, device="cpu"), config, written)
    return planned_bytes(planned, written, layout(config).n_layer)


def _params(weights) -> int:
    import math

    return sum(math.prod(weights.shape(n)) for n in weights.names())


def gguf_file(run, folder: Path, file_name: str | None, gguf_type: str, mf_name: str,
              progress: Progress = None) -> tuple[Path, list[str], dict[str, Any]]:
    """Write the merged model as ``folder/file_name`` in ``gguf_type`` plus its Modelfile; read both back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.tuned import gguf_check, ollama
    from studio.tuned.gguf_writer import plan, write_gguf_weights

    written, note = resolve_type(gguf_type)
    if note and progress:
        progress(note)
    gguf_path = folder / (file_name or default_name(run, written))
    merged = reference.merged_weights(run)
    config, tok = run.config(), run.tokenizer()
    n_params = _params(merged)
    ids = reference.probe_ids(tok)
    want = reference.reference_logits(run, ids, progress) if n_params <= LOGITS_UP_TO else None
    size = estimate_bytes(run, "gguf", written)
    if progress:
        progress(f"Writing {gguf_path.name} ({written}, {'about ' if written == 'q4_k_m' else ''}"
                 f"{size / 1e9:.2f} GB)…")
    t = time.time()
    target = gguf_path.with_name(f".{gguf_path.stem}.f16.partial.gguf") if written == "q4_k_m" else gguf_path
    try:
        info = write_gguf_weights(merged, config, tok, target, gguf_type=written, name=f"{run.cfg.name} (KTO)",
                                  progress=progress)
        if written == "q4_k_m":
            if progress:
                progress(f"llama-quantize: {target.name} -> {gguf_path.name} (Q4_K_M)…")
            gguf_quant.llama_quantize(target, gguf_path, "Q4_K_M")
    finally:
        if target != gguf_path:
            target.unlink(missing_ok=True)
    seconds = round(time.time() - t, 1)
    (folder / mf_name).write_text(ollama.modelfile(gguf_path.name, getattr(tok, "chat_template", None)),
                                  encoding="utf-8")

    if progress:
        progress("Reading the GGUF file back to check it…")
    lay, planned = plan(merged, config, "f16" if written == "q4_k_m" else written)
    checks: dict[str, Any] = {"gguf_type": written, "bytes": gguf_path.stat().st_size, "write_seconds": seconds,
                              "tensors_written": info["tensors"]}
    if note:
        checks["note"] = note
    as_written: dict | None = {} if want is not None and written not in ("f16", "f32") else None
    checks.update(gguf_check.check_model_file(gguf_path, merged, lay, planned, n_params, as_written))
    try:
        gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001 - transformers' GGUF tokenizer reader has gaps of its own
        checks["tokenizer_same_ids"] = f"not compared: transformers could not read the tokenizer back ({e})"
    else:
        text = reference.probe_text(tok)
        checks["tokenizer_same_ids"] = (gguf_tok(text, add_special_tokens=False)["input_ids"]
                                        == tok(text, add_special_tokens=False)["input_ids"])
        if not checks["tokenizer_same_ids"]:
            raise ExportError("the GGUF file's tokenizer splits a chat prompt differently from the model's "
                              "tokenizer")
    if want is not None:
        if progress:
            progress("Loading the GGUF file with transformers to compare its logits…")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_path.name, dtype=torch.float32)
        with torch.inference_mode():
            got = loaded(input_ids=ids).logits.float()
        del loaded
        gc.collect()
        precision = {"f32": "float32", "f16": "16-bit", "q8_0": "8-bit"}.get(written, "4-bit")
        # the floor: the model with exactly the rounded weights the file holds (read by ``gguf`` in the model's own
        # layout). How far the trained model's logits move under that rounding depends on the model (a random-weight
        # one, with flat logits, changes its top token under 4-bit rounding where a trained one does not), so the
        # file is held to its own floor, and transformers' reading of it must give the floor's logits themselves:
        # a wrong name, permutation or metadata moves them far beyond arithmetic order.
        floor = reference.logits_of_weights(config, as_written, ids) if as_written else None
        as_written = None
        vs = reference.compare(got, want, precision, floor=floor)
        if floor is not None:
            read = reference.compare(got, floor, "16-bit")
            vs["vs_file_weights"] = {k: read[k] for k in ("max_abs_logit_diff", "top1_agreement", "tolerance", "ok")}
            vs["ok"] = vs["ok"] and read["ok"]
        checks["vs_adapter_model"] = vs
        if lay.rope_type == "llama3":
            # transformers' GGUF reader ignores llama.cpp's rope_freqs tensor: its logits are only a rough check
            checks["logits_note"] = "llama3 rope scaling: rope_freqs is for llama.cpp; transformers ignores it"
        elif not vs["ok"]:
            raise ExportError(f"the GGUF file, loaded back, does not reproduce the trained model within what "
                              f"{written} allows: {vs}")
    else:
        checks["logits"] = f"not compared: {n_params / 1e9:.1f}B parameters are too many to load in float32 twice"
    checks.update(_llama_cpp(gguf_path, None, tok))
    return gguf_path, [gguf_path.name, mf_name], checks


def gguf_adapter(run, folder: Path, file_name: str | None, mf_name: str, progress: Progress = None,
                 base_gguf: str | None = None) -> tuple[Path, list[str], dict[str, Any]]:
    """Write the LoRA as a llama.cpp GGUF adapter plus a Modelfile (FROM base, ADAPTER file); read it back."""
    from studio.tuned import gguf_check, ollama
    from studio.tuned.gguf_writer import layout, write_lora_gguf
    from studio.tuned.merge import read_lora

    lora = read_lora(run.choice.path)
    config, tok = run.config(), run.tokenizer()
    path = folder / (file_name or f"{run.cfg.name}-lora-F16.gguf")
    if progress:
        progress(f"Writing {path.name} (the LoRA alone, f16, {estimate_bytes(run, 'gguf-adapter') / 1e6:.1f} MB)…")
    info = write_lora_gguf(lora, config, path, name=f"{run.cfg.name} (KTO LoRA)")
    (folder / mf_name).write_text(ollama.adapter_modelfile(path.name, run.cfg.model.name_or_path,
                                                           getattr(tok, "chat_template", None), base_gguf),
                                  encoding="utf-8")
    if progress:
        progress("Reading the GGUF adapter back to check it…")
    checks: dict[str, Any] = {"bytes": path.stat().st_size, "rank": info["rank"],
                              "ollama_from": ollama.library_name(run.cfg.model.name_or_path) or base_gguf
                              or "a GGUF of the base model (see the Modelfile)"}
    checks.update(gguf_check.check_adapter_file(path, lora, layout(config), info["alpha"]))
    base = base_gguf or _bundled_gguf(run)
    if base:
        checks.update(_llama_cpp(Path(base), path, tok))
    return path, [path.name, mf_name], checks


def _bundled_gguf(run) -> str | None:
    """The bundled model's own GGUF (the file its checkpoint was converted from): a base llama.cpp can load."""
    from studio.config.run import BUNDLED_MODEL

    if run.cfg.model.name_or_path != BUNDLED_MODEL:
        return None
    from studio.models import bundled

    return str(bundled.gguf_path())


def _llama_cpp(model: Path, lora: Path | None, tok) -> dict[str, Any]:
    """Generate a few tokens with llama.cpp when it is installed: the file loads and runs there."""
    text = gguf_quant.llama_generate(model, "The capital of France is", lora=lora)
    if text is None:
        return {"llama_cpp": "not installed (llama-completion not on PATH or in "
                             f"${gguf_quant.LLAMA_CPP_ENV}): not run"}
    return {"llama_cpp": "loads and generates", "llama_cpp_text": text.strip()[:80]}
