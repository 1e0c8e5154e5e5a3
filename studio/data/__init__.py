"""The data layer: read users' files, convert them to KTO rows, and hand the engine a shuffled dataset.

No Gradio here; the Data tab and ``python -m studio data`` sit on top of it.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config.run import SAMPLE_DATA, RunConfig
from studio.data.normalize import DataError, Normalized, normalize, parse_label  # noqa: F401
from studio.data.balance import check as check_weights
from studio.data.balance import suggest_weights
from studio.data.readers import read_records

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "samples" / "sample_kto.jsonl"


def resolve(source: str) -> str:
    return str(SAMPLE_PATH) if source == SAMPLE_DATA else source


def load_kto(source: str, mapping: dict[str, str] | None = None, *, strict: bool = True, seed: int = 42,
             progress=None, skip_bad_lines: bool = False) -> Normalized:
    """KTO rows (prompt, completion, label) from any supported file, folder or hub id.

    ``skip_bad_lines``: JSONL lines that are not JSON objects are left out and listed (``skipped_lines`` and a note
    in ``conversions``) instead of refusing the whole file.

    ``strict``: rows with an unknown label raise DataError (training); otherwise they come back with label None and
    are listed in ``unlabeled`` for a person to fix (Data tab, CLI)."""
    # progress(fraction, message): reading is the first half, converting the second
    read_p = (lambda f, m: progress(0.5 * f, m)) if progress else None
    conv_p = (lambda f, m: progress(0.5 + 0.5 * f, m)) if progress else None
    # Python's cycle collector rescans the millions of new strings/dicts of a large file again and again (40% of
    # the time at 90k pairs) though they hold no cycles: off while loading, back on (and run once) after
    was_on = gc.isenabled()
    gc.disable()
    try:
        skipped: list | None = [] if skip_bad_lines else None
        records = read_records(resolve(source), read_p, skipped)
        norm = normalize(records, mapping, strict=strict, seed=seed, progress=conv_p)
        if skipped:
            norm.skipped_lines = skipped
            shown = ", ".join(str(s["line"]) for s in skipped[:20]) + (" …" if len(skipped) > 20 else "")
            norm.conversions.insert(0, f"{len(skipped)} broken line{'s' if len(skipped) != 1 else ''} skipped "
                                       f"(line {shown}; line {skipped[0]['line']} is {skipped[0]['error']})")
        return norm
    finally:
        if was_on:
            gc.enable()


@dataclass
class TrainingData:
    train: Any  # datasets.Dataset
    eval: Any | None
    n_desirable: int
    n_undesirable: int
    conversions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # advice that does not stop training (weights, one label only)


def prepare_training(cfg: RunConfig) -> TrainingData:
    """Datasets for KTOTrainer: normalized, split, and shuffled with the run's seed (TRL never shuffles)."""
    from datasets import Dataset

    norm = load_kto(cfg.data.train_file)
    rows = norm.rows
    eval_rows = None
    if cfg.data.eval_file:
        eval_rows = load_kto(cfg.data.eval_file).rows
    if not eval_rows and cfg.data.eval_fraction > 0:
        # whole prompt groups, so that held-out pairs stay pairs (studio.data.clean.split_by_prompt)
        from studio.data.clean import split_by_prompt

        train_idx, eval_idx = split_by_prompt(rows, cfg.data.eval_fraction, cfg.train.seed, cfg.data.eval_max_rows)
        eval_rows = [rows[i] for i in eval_idx]
        rows = [rows[i] for i in train_idx]
    ds = Dataset.from_list(rows)
    if cfg.data.shuffle:
        ds = ds.shuffle(seed=cfg.train.seed).flatten_indices()
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    n_pos = sum(ds["label"])
    n_neg = len(ds) - n_pos
    if len(ds) < cfg.train.per_device_train_batch_size:
        raise DataError(
            f"only {len(ds)} training rows, fewer than one batch of {cfg.train.per_device_train_batch_size}: "
            "add rows or lower train.per_device_train_batch_size (KTO needs at least 2)"
        )
    notes = []
    if n_pos == 0 or n_neg == 0:
        notes.append(suggest_weights(n_pos, n_neg).note)
    else:
        warning = check_weights(n_pos, n_neg, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
        if warning:
            notes.append(warning)
    return TrainingData(ds, eval_ds, n_pos, n_neg, norm.conversions, notes)
