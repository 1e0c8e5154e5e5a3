"""TRL's data side: the TRL version check, TRL's public data utilities, and KTO rows rendered to tokens as TRL does.

One of the two modules of the studio that import ``trl`` (tests/test_trl_seam.py checks that no other does). The
other is ``studio/training/trl_seam.py``, which owns everything about TRL's trainer: the KTOTrainer/KTOConfig
classes, its private members, the log-prob kernel and its tile sizes. Why two: the data readers (``data/``) and the
held-out evaluation (``tuned/``) need TRL's tokenization rules too, and they sit below ``training/`` in the import
direction (paths < config < models < data < runs < tuned < training < ui/cli), so they cannot import the trainer
seam. This module is what they share: it imports only ``trl.data_utils`` (public, stable: it did not move when KTO
moved into ``trl.experimental`` and back), and it holds the version check, which the trainer seam re-exports.

Upgrading TRL: set ``TESTED_TRL`` here, then fix whatever ``trl_seam.py`` (trainer internals) or this module (data
utilities) reports missing. Another installed version warns once (``TrlVersionWarning``); a member the studio needs
and the installed TRL lacks raises ``TrlVersionError`` naming both versions and the fix, instead of an
AttributeError deep inside training.

TRL is imported lazily, inside functions: Unsloth must be imported before transformers/TRL on its path.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from studio.errors import StudioError

TESTED_TRL = "1.15.0"  # the version the studio's use of TRL is tested with (requirements pin it too)
FIX = f"install the tested version: pip install trl=={TESTED_TRL}"


class TrlVersionError(StudioError, RuntimeError):
    """The installed TRL lacks something the studio uses; the message names both versions and what to do."""


class TrlVersionWarning(UserWarning):
    """The installed TRL is not the tested one (but has what the studio uses)."""


_warned: set[str] = set()


def installed_version() -> str:
    """``trl.__version__`` of the installed TRL (imports it)."""
    try:
        import trl
    except ImportError as e:
        raise TrlVersionError(f"TRL is not installed ({e}); KTO Studio needs trl {TESTED_TRL}: {FIX}") from e
    return str(getattr(trl, "__version__", "unknown"))


def check_version() -> str:
    """The installed TRL version; warns once per version when it is not ``TESTED_TRL``."""
    version = installed_version()
    if version != TESTED_TRL and version not in _warned:
        _warned.add(version)
        warnings.warn(f"trl {version} is installed; KTO Studio was tested with trl {TESTED_TRL}. It goes on while "
                      f"the parts it uses are there; if training misbehaves, {FIX}", TrlVersionWarning, stacklevel=2)
    return version


def missing(what: str, detail: str = "") -> TrlVersionError:
    """The error for a TRL member the studio needs and the installed TRL lacks."""
    return TrlVersionError(f"trl {installed_version()} has no {what}, which KTO Studio uses (tested with trl "
                           f"{TESTED_TRL}){': ' + detail if detail else ''}. To fix it, {FIX} (or update "
                           "studio/training/trl_seam.py and studio/data/trl_data.py for this version)")


def member(module: str, name: str) -> Any:
    """``module.name`` from TRL (e.g. ``member("trl.data_utils", "common_prefix_length")``), after the version check;
    ``TrlVersionError`` when the module or the name is missing."""
    check_version()
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise missing(f"module {module}", str(e)) from e
    if not hasattr(mod, name):
        raise missing(f"{module}.{name}")
    return getattr(mod, name)


# ---- TRL's public data utilities -----------------------------------------------------------------------------------

def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """How many leading tokens two sequences share (``trl.data_utils.common_prefix_length``): where TRL's KTO
    trainer starts a completion when the prompt's tokens are not a prefix of prompt+completion's."""
    return member("trl.data_utils", "common_prefix_length")(ids, other_ids)


def unpair_preference_dataset(dataset, **kwargs: Any):
    """Paired preference rows (prompt, chosen, rejected) to unpaired KTO rows (``trl.data_utils``)."""
    return member("trl.data_utils", "unpair_preference_dataset")(dataset, **kwargs)


# ---- KTO's tokenization, as TRL's KTOTrainer renders rows ----------------------------------------------------------

def kto_token_ids(tokenizer: Any, rows: list[dict[str, Any]], conversational: bool
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each row's prompt and of prompt+completion, rendered as TRL's KTO trainer renders them
    (conversations through the chat template with the generation prompt; text with EOS appended to the
    completion). The completion starts where the two diverge (``common_prefix_length``).
    Shared by the Data tab's length report and the held-out evaluation."""
    if conversational:
        prompt_text = tokenizer.apply_chat_template([r["prompt"] for r in rows], tokenize=False,
                                                    add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([r["prompt"] + r["completion"] for r in rows], tokenize=False)
        # apply_chat_template(tokenize=True) adds no special tokens: the template already has them
        return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
                tokenizer(full_text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token or ""
    completions = [c if c.endswith(eos) else c + eos for c in (r["completion"] for r in rows)]
    return (tokenizer([r["prompt"] for r in rows])["input_ids"],
            tokenizer([r["prompt"] + c for r, c in zip(rows, completions)])["input_ids"])
