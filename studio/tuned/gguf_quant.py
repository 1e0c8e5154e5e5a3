"""GGUF tensor types: which type each tensor gets, how big the file will be, quantizing on every core, and
llama.cpp's own tools when they are installed.

Types a user picks (``--gguf-type``):

- ``f16`` / ``f32``: every matrix in 16/32-bit floats.
- ``q8_0``: every matrix in Q8_0 (8.5 bits a weight); near-lossless, about half of f16.
- ``q4_k_m``: llama.cpp's Q4_K_M (about 4.9 bits a weight), written by its ``llama-quantize`` from a 16-bit GGUF the
  studio writes first. Found on PATH or in ``$KTO_STUDIO_LLAMA_CPP`` (a folder of llama.cpp's binaries). Without it
  the export writes ``q4_0`` instead and says so.
- ``q4_0``: the best 4-bit mix the ``gguf`` package itself writes (it has no K-quants): Q4_0 matrices, Q5_0 for the
  attention values and feed-forward outputs of the layers Q4_K_M gives more bits (the first and last eighth and
  every third between), and Q8_0 for the output matrix (or the tied embedding, which is also the output).
  Llama-3.1-8B: about 4.9 GB, against 16 GB in f16.

As llama.cpp does, norms and other 1-D tensors stay float32, and a matrix whose rows are not a whole number of
quantization blocks stays f16. Quantizing runs in worker processes over row chunks of every tensor, so a 7-8B model
takes about a minute on a many-core machine; results are written in order as they come, two copies never held.
"""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

TYPES = ("q4_k_m", "q8_0", "q4_0", "f16", "f32")
DEFAULT_TYPE = "q4_k_m"
LLAMA_CPP_ENV = "KTO_STUDIO_LLAMA_CPP"
DESCRIPTIONS = {
    "q4_k_m": "4-bit, llama.cpp's Q4_K_M (needs llama.cpp's llama-quantize; else q4_0): the size that fits an 8 GB "
              "card",
    "q8_0": "8-bit Q8_0: near-lossless, half of f16",
    "q4_0": "4-bit mix the gguf package writes (Q4_0/Q5_0, Q8_0 output), no llama.cpp needed",
    "f16": "16-bit floats: exact to the merged weights' precision, largest",
    "f32": "32-bit floats: exact, twice f16",
}
# relative RMS error a tensor may show after a round trip through each type (measured ~0.005 for Q8_0, ~0.09 for
# Q4_0 and ~0.04 for Q5_0 on Gaussian weights; real weights with outliers a little more)
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q5_1": 0.06,
             "Q5_K": 0.06, "Q4_0": 0.15, "Q4_1": 0.15, "Q4_K": 0.15, "Q3_K": 0.3, "Q2_K": 0.6}
_CHUNK = 1 << 22  # elements a worker quantizes at once (16 MB of float32)


def _q():
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType


def more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's rule for the layers Q4_K_M quantizes with more bits."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def tensor_type(gg_name: str, shape: tuple[int, ...], gguf_type: str, n_layer: int, tied: bool):
    """The GGML type of one tensor in a file of ``gguf_type`` (f32, f16, q8_0, q4_0; q4_k_m is written as f16 or
    bf16 first and quantized by llama-quantize)."""
    Q = _q()
    if len(shape) < 2 or gguf_type == "f32":
        return Q.F32
    if gguf_type in ("f16", "q4_k_m"):
        return Q.F16
    if shape[-1] % 32:
        return Q.F16  # rows that are not whole blocks: llama.cpp too keeps such matrices unquantized
    if gguf_type == "q8_0":
        return Q.Q8_0
    if gguf_type != "q4_0":
        raise ValueError(f"unknown GGUF type {gguf_type}")
    if gg_name == "output.weight" or (tied and gg_name == "token_embd.weight"):
        return Q.Q8_0
    parts = gg_name.split(".")
    if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and more_bits(int(parts[1]), n_layer):
        return Q.Q5_0
    return Q.Q4_0


def nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def q4_k_m_bytes(gg_name: str, shape: tuple[int, ...], n_layer: int) -> float:
    """About how many bytes llama-quantize gives a tensor in Q4_K_M (Q6_K output and the layers with more bits of
    attn_v/ffn_down, Q4_K the rest; f32 vectors)."""
    n = int(np.prod(shape))
    if len(shape) < 2:
        return 4.0 * n
    parts = gg_name.split(".")
    six = gg_name == "output.weight" or (parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down")
                                         and more_bits(int(parts[1]), n_layer))
    if shape[-1] % 256:
        return n * (8.5 if six else 5.5) / 8  # llama.cpp falls back to Q8_0 / Q5_0 for such rows
    return n * (6.5625 if six else 4.5) / 8


def to_numpy(t, qtype) -> np.ndarray:
    """A float32 torch tensor as the array the file stores for F32/F16 (other types: float32, quantized later)."""
    import torch

    Q = _q()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    return t.to(torch.float32).numpy()


def _quantize_chunk(args) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    arr, qtype = args
    return quants.quantize(arr, GGMLQuantizationType(qtype))


def _chunks(arr: np.ndarray) -> list[np.ndarray]:
    rows = max(1, _CHUNK // max(1, arr.shape[-1]))
    flat = arr.reshape(-1, arr.shape[-1])
    return [flat[i:i + rows] for i in range(0, flat.shape[0], rows)]


def quantized_stream(items: Iterable[tuple[object, np.ndarray]], workers: int | None = None,
                     total_elements: int = 0) -> Iterator[np.ndarray]:
    """For each (qtype, float32 array) in order, the bytes to write: F32/F16 arrays pass through, others are
    quantized by ``gguf.quants`` in row chunks on ``workers`` processes (spawned: they import numpy and gguf only,
    safe beside the web server's threads), at most two chunks per worker in flight."""
    import concurrent.futures as cf
    import multiprocessing as mp

    Q = _q()
    workers = workers or os.cpu_count() or 1
    if workers < 2 or total_elements < 32 * 2**20:
        for qtype, arr in items:
            yield arr if qtype in (Q.F32, Q.F16) else _quantize_chunk((arr, int(qtype)))
        return
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending: collections.deque = collections.deque()  # (qtype, shape, futures) or (None, None, array), in order
        in_flight = 0

        def oldest() -> np.ndarray:
            nonlocal in_flight
            qtype, shape, part = pending.popleft()
            if qtype is None:
                return part
            in_flight -= len(part)
            out = np.concatenate([f.result() for f in part], axis=0)
            return out.reshape(*shape[:-1], out.shape[-1])

        for qtype, arr in items:
            if qtype in (Q.F32, Q.F16):
                pending.append((None, None, arr))
            else:
                futures = [pool.submit(_quantize_chunk, (c, int(qtype))) for c in _chunks(arr)]
                pending.append((qtype, arr.shape, futures))
                in_flight += len(futures)
            # keep every worker busy while bounding memory: wait for the oldest tensor when enough is queued
            while pending and (in_flight > 2 * workers or len(pending) > 4 * workers):
                yield oldest()
        while pending:
            yield oldest()


# ---- llama.cpp's tools -----------------------------------------------------------------------------------------

def llama_tool(name: str) -> str | None:
    """A llama.cpp binary (llama-quantize, llama-completion): in $KTO_STUDIO_LLAMA_CPP (or its bin/) or on PATH."""
    folder = os.environ.get(LLAMA_CPP_ENV)
    if folder:
        for d in (Path(folder), Path(folder) / "bin"):
            if (d / name).is_file() and os.access(d / name, os.X_OK):
                return str(d / name)
    return shutil.which(name)


def llama_quantize(src: Path, dst: Path, qtype: str = "Q4_K_M", threads: int | None = None) -> None:
    from studio.tuned.merge import ExportError

    tool = llama_tool("llama-quantize")
    if tool is None:
        raise ExportError(f"llama.cpp's llama-quantize was not found (PATH or ${LLAMA_CPP_ENV})")
    p = subprocess.run([tool, str(src), str(dst), qtype, str(threads or os.cpu_count() or 1)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise ExportError(f"llama-quantize failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-400:]}")


def llama_generate(model: Path, prompt: str, lora: Path | None = None, n: int = 8, timeout: int = 600) -> str | None:
    """Greedy text from llama.cpp's llama-completion (None when it is not installed); raises when it fails."""
    from studio.tuned.merge import ExportError

    tool = llama_tool("llama-completion")
    if tool is None:
        return None
    cmd = [tool, "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv", "--no-warmup",
           "-c", "512", "--no-display-prompt"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise ExportError(f"llama.cpp could not run {model.name}{' with ' + lora.name if lora else ''}: "
                          f"{(p.stderr or p.stdout).strip()[-400:]}")
    return p.stdout
