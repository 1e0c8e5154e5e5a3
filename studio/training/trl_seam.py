"""The one seam to TRL's trainer: everything the studio touches inside TRL's KTOTrainer goes through here.

What lives here: the KTOTrainer/KTOConfig classes (``kto_trainer_class``, ``kto_config``), the trainer's private
members that micro-batching (``microbatch.py``) and the precomputed reference (``speed.py``) use, as small named
functions; the name of TRL's frozen reference adapter; the tile sizes of TRL's log-prob kernel (read from TRL when
it is loaded, else the tested constants; ``memory.py`` sizes the logits with them); and the hook that puts the
studio's PyTorch log-prob kernel (``logprob.py``) where TRL looks for its Triton one.

TRL's data side (the version check, ``trl.data_utils``, KTO's tokenization) is ``studio/data/trl_data.py``: the data
readers and the held-out evaluation need it and sit below ``training/`` in the import direction. Those two are the
only modules of ``studio/`` that import ``trl`` (tests/test_trl_seam.py checks it). TRL has moved KTO before (into
``trl.experimental`` and back): an upgrade changes ``TESTED_TRL`` and whatever these two report missing.

Versions: reaching TRL (the classes, the kernel, a data utility) runs ``check_version`` (a ``TrlVersionWarning``
once when the installed TRL is not ``TESTED_TRL``); a member the studio needs and the installed TRL lacks raises ``TrlVersionError`` naming the
installed and tested versions and the fix, before training starts where it can (``kto_trainer_class`` checks the
methods micro-batching and precomputing call).

TRL is imported lazily, inside functions: Unsloth must be imported before transformers/TRL on its path.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from studio.data.trl_data import (TESTED_TRL, TrlVersionError, TrlVersionWarning, check_version,  # noqa: F401
                                  member, missing)

REFERENCE_ADAPTER = "ref"  # the name TRL's KTOTrainer gives its frozen copy of a PEFT model's adapter

# Tile sizes of TRL's chunked log-prob kernel, as tested (TRL's values win when TRL is loaded: ``logprob_tiles``)
LOGPROB_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
LOGPROB_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE

# KTOTrainer methods the studio calls or wraps: checked when the class is handed out
TRAINER_METHODS = ("_compute_kl_logps", "compute_ref_log_probs", "_compute_loss", "_precompute_ref_logps",
                   "_prepare_dataset")


def _attr(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise missing(f"{type(obj).__name__}.{name}" if not isinstance(obj, type) else f"{obj.__name__}.{name}")
    return getattr(obj, name)


# ---- classes -------------------------------------------------------------------------------------------------------

def kto_trainer_class():
    """TRL's ``KTOTrainer``, after checking the version and the methods the studio uses."""
    cls = member("trl", "KTOTrainer")
    for name in TRAINER_METHODS:
        _attr(cls, name)
    return cls


def taking_prepared(cls, prepared: list) -> type:
    """``cls`` (a KTOTrainer class) whose constructor takes the datasets in ``prepared`` as they are: rows it
    prepared before (tokenized, KL completions added, over-long prompts dropped: ``_prepare_dataset``) and that the
    run's cache kept (``studio.runs.cache``). Any other dataset is prepared as usual."""
    _attr(cls, "_prepare_dataset")

    class TakingPrepared(cls):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if any(dataset is d for d in prepared):
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

    TakingPrepared.__name__ = TakingPrepared.__qualname__ = cls.__name__
    return TakingPrepared


def kto_config_class():
    """TRL's ``KTOConfig``."""
    return member("trl", "KTOConfig")


def kto_config(cfg, **kwargs: Any):
    """TRL's KTOConfig for a run config: ``cfg.kto_config_fields(**kwargs)`` (device, precision, engine overrides)."""
    return kto_config_class()(**cfg.kto_config_fields(**kwargs))


# ---- the log-prob kernel -------------------------------------------------------------------------------------------

def logprob_kernel():
    """The kernel TRL scores tokens with (``trl.trainer.utils._ChunkedLogProbFunction``); None without Triton."""
    utils = _trainer_utils()
    return _attr(utils, "_ChunkedLogProbFunction")


def set_logprob_kernel(kernel) -> None:
    """Make TRL score tokens with ``kernel`` (same call signature and outputs as TRL's Triton kernel)."""
    utils = _trainer_utils()
    _attr(utils, "_ChunkedLogProbFunction")
    utils._ChunkedLogProbFunction = kernel


def logprob_tiles() -> tuple[int, int]:
    """(token tile, vocabulary tile) of TRL's log-prob kernel: TRL's own values when its modules are already
    loaded (never imported just for this: Unsloth must come first, and an estimate should not pay for importing
    TRL), else the tested constants."""
    token, vocab = LOGPROB_TOKEN_TILE, LOGPROB_VOCAB_TILE
    kernel = sys.modules.get("trl.kernels.chunked_logprob")
    utils = sys.modules.get("trl.trainer.utils")
    token = int(getattr(kernel, "TOKEN_CHUNK_SIZE", token))
    vocab = int(getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab))
    return token, vocab


def _trainer_utils():
    check_version()
    try:
        from trl.trainer import utils
    except ImportError as e:
        raise missing("module trl.trainer.utils", str(e)) from e
    return utils


# ---- the reference model -------------------------------------------------------------------------------------------

def reference_model(trainer):
    """The model TRL scores the reference with: its separate reference model, else the (PEFT) model itself."""
    ref = _attr(trainer, "ref_model")
    return ref if ref is not None else trainer.model


def reference_logps(trainer, model, batch):
    """TRL's reference log-probs of a batch's completions and KL completions (KL: None when KTO computes none)."""
    return _attr(trainer, "compute_ref_log_probs")(model, batch)


def uses_precomputed_reference(trainer) -> bool:
    """Whether TRL reads the reference log-probs from the batch (``ref_logps``/``ref_KL_logps``)."""
    return bool(_attr(trainer, "precompute_ref_logps"))


def set_precomputed(trainer, rows_per_pass: int, model_hash: str | None = None) -> None:
    """Switch a built trainer to precomputed reference log-probs, as its constructor does with
    ``precompute_ref_log_probs``; ``model_hash`` keys TRL's cache of them (None: TRL's hash of every weight)."""
    _attr(trainer, "precompute_ref_logps")
    trainer.precompute_ref_logps = True
    trainer.args.precompute_ref_log_probs = True
    trainer.args.precompute_ref_batch_size = rows_per_pass
    if not model_hash:
        model_hash = member("trl.trainer.utils", "hash_module")(reference_model(trainer))
    _attr(trainer, "_precompute_model_hash")
    trainer._precompute_model_hash = model_hash


def precompute_split(trainer, dataset, split: str, rows_per_pass: int):
    """``dataset`` with the reference log-probs added as columns (TRL's pass, cached under the model hash)."""
    return _attr(trainer, "_precompute_ref_logps")(dataset, split, rows_per_pass)


@contextlib.contextmanager
def counting_reference_passes(trainer, on_pass: Callable[[], None]) -> Iterator[None]:
    """Within: ``on_pass()`` after each of TRL's reference passes (``compute_ref_log_probs``, once per batch)."""
    compute = _attr(trainer, "compute_ref_log_probs")

    def counted(*args, **kwargs):
        out = compute(*args, **kwargs)
        on_pass()
        return out

    trainer.compute_ref_log_probs = counted
    try:
        yield
    finally:
        del trainer.compute_ref_log_probs  # back to the class's method


# ---- KTO's loss, piece by piece (micro-batching) -------------------------------------------------------------------

def computes_kl(trainer) -> bool:
    """Whether the loss type has a KL term (TRL then computes the policy's KL log-probs of mismatched pairs)."""
    return bool(_attr(trainer, "calculate_KL"))


def policy_kl_logps(trainer, model, batch):
    """The policy's log-probs of the batch's KL (mismatched) completions."""
    return _attr(trainer, "_compute_kl_logps")(model, batch)


def kto_loss(trainer, model, batch):
    """TRL's KTO loss of a batch (logs its metrics into ``train_metrics``)."""
    return _attr(trainer, "_compute_loss")(model, batch, False)


def class_reference_logps(cls, trainer, model, batch):
    """``cls``'s own ``compute_ref_log_probs`` on ``trainer`` (for a subclass that overrides it)."""
    return _attr(cls, "compute_ref_log_probs")(trainer, model, batch)


def class_kto_loss(cls, trainer, model, batch, return_outputs: bool = False):
    """``cls``'s own ``_compute_loss`` on ``trainer`` (a subclass that overrides it calls its base's through here)."""
    return _attr(cls, "_compute_loss")(trainer, model, batch, return_outputs)


def train_metrics(trainer) -> dict[str, list[float]]:
    """The lists TRL appends each training metric's values to until it logs them."""
    return _attr(trainer, "_metrics")["train"]


@contextlib.contextmanager
def supplied_reference(trainer, policy_kl=None) -> Iterator[None]:
    """Within: TRL's loss reads the reference log-probs from the batch (``ref_logps``, ``ref_KL_logps``) instead of
    computing them, and, with ``policy_kl`` given, takes it as the policy's KL log-probs instead of a forward pass
    (every micro-batch then shares the whole batch's KL term)."""
    precomputed = uses_precomputed_reference(trainer)
    had_kl_attr = "_compute_kl_logps" in vars(trainer)
    old_kl_attr = vars(trainer).get("_compute_kl_logps")
    try:
        trainer.precompute_ref_logps = True
        if policy_kl is not None:
            _attr(trainer, "_compute_kl_logps")
            trainer._compute_kl_logps = lambda _model, _batch: policy_kl
        yield
    finally:
        trainer.precompute_ref_logps = precomputed
        if had_kl_attr:
            trainer._compute_kl_logps = old_kl_attr
        else:
            vars(trainer).pop("_compute_kl_logps", None)


# ---- transformers.Trainer internals (checkpoint saves, micro-batched steps) --------------------------------------------

def checkpoint_save(trainer) -> Callable:
    """The trainer's checkpoint writer (``Trainer._save_checkpoint(model, trial)``)."""
    return _attr(trainer, "_save_checkpoint")


def replace_checkpoint_save(trainer, save: Callable) -> None:
    """Make ``save(model, trial=None)`` the trainer's checkpoint writer (``runs/checkpoints.atomic_saves``)."""
    _attr(trainer, "_save_checkpoint")
    trainer._save_checkpoint = save


def output_dir(trainer, trial=None) -> str:
    """Where the trainer writes checkpoints (``Trainer._get_output_dir``)."""
    return _attr(trainer, "_get_output_dir")(trial=trial)


@contextlib.contextmanager
def output_dir_as(trainer, path) -> Iterator[None]:
    """Within: the trainer writes its checkpoint into ``path`` (a staging folder) instead of its output_dir."""
    _attr(trainer, "_get_output_dir")
    trainer._get_output_dir = lambda trial=None: str(path)
    try:
        yield
    finally:
        del trainer._get_output_dir  # back to the class's method


def prepare_context_parallel_inputs(trainer, model, inputs):
    """``Trainer._prepare_context_parallel_inputs``: (the context to run in, the inputs)."""
    return _attr(trainer, "_prepare_context_parallel_inputs")(model, inputs)


def prepare_inputs(trainer, inputs):
    """``Trainer._prepare_inputs``: the batch on the trainer's device."""
    return _attr(trainer, "_prepare_inputs")(inputs)


def learning_rate(trainer) -> float:
    """``Trainer._get_learning_rate``: the scheduler's current learning rate."""
    return _attr(trainer, "_get_learning_rate")()


def kl_supplied(trainer) -> bool:
    """Whether the caller supplied the policy's KL log-probs for this step (``supplied_reference`` with a KL)."""
    return "_compute_kl_logps" in vars(trainer)
