"""The one seam to TRL (studio/training/trl_seam.py, with its data side studio/data/trl_data.py): only these two
modules import TRL or touch its private names; another TRL version is named clearly; the seam's functions do what
micro-batching and the precomputed reference need."""
from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

import pytest

from studio.data import trl_data
from studio.training import microbatch, trl_seam
from tests.test_microbatch import _trainer

STUDIO = Path(__file__).resolve().parents[1] / "studio"
# The only modules of studio/ that import trl: the trainer seam, and its data side (tokenization and trl.data_utils,
# needed by data/ and tuned/, which sit below training/ in the import direction)
SEAM_MODULES = {"training/trl_seam.py", "data/trl_data.py"}
# TRL's private or trainer-internal names the studio uses: only the seam may spell them
TRL_PRIVATE = {"_ChunkedLogProbFunction", "_CHUNKED_LOGPROB_CHUNK_SIZE", "TOKEN_CHUNK_SIZE", "_compute_kl_logps",
               "compute_ref_log_probs", "_compute_loss", "_precompute_ref_logps", "_precompute_model_hash",
               "precompute_ref_logps", "calculate_KL", "_metrics", "hash_module"}
# transformers.Trainer's private members the studio reaches (checkpoint saves, micro-batched steps): the seam's too
TRAINER_PRIVATE = {"_save_checkpoint", "_get_output_dir", "_prepare_inputs", "_prepare_context_parallel_inputs",
                   "_get_learning_rate"}


def _modules():
    for f in sorted(STUDIO.rglob("*.py")):
        yield f.relative_to(STUDIO).as_posix(), ast.parse(f.read_text(encoding="utf-8"))


def test_only_the_seam_imports_trl():
    importers = set()
    for name, tree in _modules():
        for node in ast.walk(tree):  # lazy imports inside functions count too
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "trl" or m.startswith("trl.") for m in mods):
                importers.add(name)
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] == "trl":
                importers.add(name)
    assert importers <= SEAM_MODULES, f"only {sorted(SEAM_MODULES)} may import trl; also: {sorted(importers - SEAM_MODULES)}"
    assert "training/trl_seam.py" in importers and "data/trl_data.py" in importers


def test_only_the_seam_touches_trls_private_names():
    """Attributes (``trainer._prepare_inputs``) and names spelled as strings (``"_compute_kl_logps" in vars(x)``,
    getattr/hasattr) both count; a class's own ``self._x`` is its own, unless it is a Trainer member."""
    touching = {}
    for name, tree in _modules():
        if name in SEAM_MODULES:
            continue
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and not (isinstance(n.value, ast.Name) and n.value.id == "self")} & (TRL_PRIVATE | TRAINER_PRIVATE)
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & TRAINER_PRIVATE
        used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)} \
            & (TRL_PRIVATE | TRAINER_PRIVATE)
        if used:
            touching[name] = sorted(used)
    assert not touching, f"TRL/Trainer internals outside the seam: {touching}"


@pytest.fixture
def other_trl(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.99.0")
    monkeypatch.setattr(trl_data, "_warned", set())
    return "1.99.0"


def test_the_tested_version_is_installed_and_says_nothing():
    import trl

    assert trl.__version__ == trl_seam.TESTED_TRL == trl_data.TESTED_TRL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trl_seam.check_version() == trl_seam.TESTED_TRL
        trl_seam.kto_trainer_class()


def test_another_version_with_the_members_warns_once_naming_both(other_trl):
    with pytest.warns(trl_seam.TrlVersionWarning) as caught:
        cls = trl_seam.kto_trainer_class()
    assert cls.__name__ == "KTOTrainer"
    text = str(caught[0].message)
    assert other_trl in text and trl_seam.TESTED_TRL in text and f"pip install trl=={trl_seam.TESTED_TRL}" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per version
        trl_seam.kto_config_class()


def test_a_missing_trainer_member_is_a_clear_error_before_training(other_trl, monkeypatch):
    import trl

    monkeypatch.delattr(trl.KTOTrainer, "_compute_kl_logps")
    with pytest.warns(trl_seam.TrlVersionWarning), pytest.raises(trl_seam.TrlVersionError) as e:
        microbatch.trainer_class(2, 4)  # what the engine calls before building the trainer
    msg = str(e.value)
    assert "_compute_kl_logps" in msg and other_trl in msg and trl_seam.TESTED_TRL in msg
    assert f"pip install trl=={trl_seam.TESTED_TRL}" in msg
    assert not isinstance(e.value, AttributeError)


def test_a_moved_class_or_data_utility_is_a_clear_error(monkeypatch):
    import trl.data_utils

    monkeypatch.delattr(trl.data_utils, "common_prefix_length")
    with pytest.raises(trl_seam.TrlVersionError, match=r"trl\.data_utils\.common_prefix_length.*tested with trl 1\.15"):
        trl_data.common_prefix_length([1, 2], [1, 3])
    with pytest.raises(trl_seam.TrlVersionError, match=r"module trl\.experimental\.kto_gone.*pip install trl==1\.15\.0"):
        trl_data.member("trl.experimental.kto_gone", "KTOTrainer")  # KTO moved again


def test_a_missing_private_member_of_a_built_trainer_is_named():
    class Trainer:  # a trainer of a TRL that renamed its state
        model = object()

    with pytest.raises(trl_seam.TrlVersionError, match=r"Trainer\.ref_model"):
        trl_seam.reference_model(Trainer())
    with pytest.raises(trl_seam.TrlVersionError, match=r"Trainer\._metrics"):
        trl_seam.train_metrics(Trainer())


def test_tile_sizes_are_trls_when_loaded_else_the_tested_ones(monkeypatch):
    from trl.trainer import utils

    assert trl_seam.logprob_tiles()[1] == utils._CHUNKED_LOGPROB_CHUNK_SIZE == trl_seam.LOGPROB_VOCAB_TILE
    monkeypatch.setattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 1000)
    assert trl_seam.logprob_tiles()[1] == 1000
    monkeypatch.delitem(sys.modules, "trl.trainer.utils")
    monkeypatch.delitem(sys.modules, "trl.kernels.chunked_logprob", raising=False)
    assert trl_seam.logprob_tiles() == (trl_seam.LOGPROB_TOKEN_TILE, trl_seam.LOGPROB_VOCAB_TILE)


def test_the_kernel_hook_sets_what_trl_calls():
    from trl.trainer import utils

    from studio.training.logprob import TorchChunkedLogProb

    before = utils._ChunkedLogProbFunction
    try:
        trl_seam.set_logprob_kernel(TorchChunkedLogProb)
        assert utils._ChunkedLogProbFunction is TorchChunkedLogProb is trl_seam.logprob_kernel()
    finally:
        utils._ChunkedLogProbFunction = before


def test_kto_config_maps_the_run_config(tmp_path):
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, **{"kto.beta": 0.3})
    args = trl_seam.kto_config(cfg, device="cpu", precompute_ref_log_probs=False)
    assert isinstance(args, trl_seam.kto_config_class())
    assert args.beta == 0.3 and args.use_cpu and args.output_dir == str(cfg.run_dir())


def test_the_seams_functions_on_a_real_trainer(tmp_path, tiny_model_dir):
    trainer = _trainer(trl_seam.kto_trainer_class(), tiny_model_dir, tmp_path, precompute=False)
    assert trl_seam.reference_model(trainer) is trainer.model  # LoRA: the reference is the "ref" adapter
    assert trl_seam.REFERENCE_ADAPTER in trainer.model.peft_config
    assert trl_seam.computes_kl(trainer) and not trl_seam.uses_precomputed_reference(trainer)
    assert trl_seam.train_metrics(trainer) is trainer._metrics["train"]
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    import torch

    with torch.no_grad():
        ref, ref_kl = trl_seam.reference_logps(trainer, trainer.model, batch)
        kl = trl_seam.policy_kl_logps(trainer, trainer.model, batch)
    assert ref.shape == ref_kl.shape == kl.shape == (len(batch["label"]),)

    # within supplied_reference the loss reads the reference from the batch and takes the given KL log-probs
    batch = dict(batch, ref_logps=ref, ref_KL_logps=ref_kl)
    fixed = torch.full_like(kl, -3.0)
    with trl_seam.supplied_reference(trainer, fixed):
        assert trl_seam.uses_precomputed_reference(trainer)
        assert trainer._compute_kl_logps(None, None) is fixed
        loss = trl_seam.kto_loss(trainer, trainer.model, batch)
    assert torch.isfinite(loss)
    assert not trl_seam.uses_precomputed_reference(trainer) and "_compute_kl_logps" not in vars(trainer)

    # precomputing: flags, cache key and counted passes, then the class's method again
    passes = []
    trl_seam.set_precomputed(trainer, 4, "key")
    assert trainer.precompute_ref_logps and trainer.args.precompute_ref_log_probs
    assert trainer.args.precompute_ref_batch_size == 4 and trainer._precompute_model_hash == "key"
    with trl_seam.counting_reference_passes(trainer, lambda: passes.append(1)):
        ds = trl_seam.precompute_split(trainer, trainer.train_dataset, "train", 4)
    assert len(passes) == -(-len(trainer.train_dataset) // 4)
    assert "compute_ref_log_probs" not in vars(trainer)
    assert {"ref_logps", "ref_KL_logps"} <= set(ds.column_names)
