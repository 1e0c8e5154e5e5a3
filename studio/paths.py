"""Where the studio keeps its files: one home folder, set by KTO_STUDIO_HOME (default ./studio_data).

Everything the studio writes lives under it: run folders, cleaned data sets, feedback, the run history and the
converted bundled model. Users' own files are only ever read.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("KTO_STUDIO_HOME", "studio_data")).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sub(name: str) -> Path:
    p = home() / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    return _sub("runs")


def data_dir() -> Path:
    return _sub("data")


def models_dir() -> Path:
    """Converted checkpoints (the bundled model); the HF hub cache stays where huggingface_hub keeps it."""
    return Path(os.environ.get("KTO_STUDIO_MODELS", home() / "models")).expanduser().resolve()
