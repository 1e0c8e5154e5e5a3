"""Presets: small YAML files under ``presets/`` that fill in part of the run config.

Three kinds, one folder each:

- ``presets/gpu/*.yaml``: a card (8 / 12 / 16 / 24 GB, CPU only, Apple MPS): how the model is loaded and the memory
  budget (``gpu_gib``) that auto-fit and the run check work against;
- ``presets/models/*.yaml``: a model from 135M to 8B: hub id, Unsloth's pre-quantized copy, licence/gating, and
  the architecture fields of its ``config.json`` so the memory estimate works before anything is downloaded;
- ``presets/recipes/*.yaml``: KTO recipes (learning rate, beta, schedule) and the effective batch they aim for.

Every preset's ``set`` section holds dotted run-config fields ({'train.learning_rate': 2e-4}); applying a preset is
``RunConfig.updated(preset.set)``, validated like any other change. Everything else in the file is metadata.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio.config.run import BUNDLED_MODEL, ConfigError, RunConfig

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
KINDS = ("gpu", "models", "recipes")
OTHER_MODEL = "other"  # the model dropdown's "any hub id / local folder / GGUF" entry


class PresetError(ConfigError):
    """An unknown or malformed preset; the message lists what exists."""


@dataclass(frozen=True)
class Preset:
    kind: str
    key: str  # file name without .yaml
    title: str
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get(name, default)


def _load(kind: str, path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PresetError(f"preset {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("set", {}), dict):
        raise PresetError(f"preset {path} must be a mapping with a 'set' mapping of run-config fields")
    changes = data.pop("set", {}) or {}
    title = data.pop("title", path.stem)
    description = (data.pop("description", "") or "").strip()
    return Preset(kind=kind, key=path.stem, title=title, description=description, set=dict(changes), meta=data)


@functools.lru_cache(maxsize=None)
def _all(kind: str, root: str) -> tuple[Preset, ...]:
    folder = Path(root) / kind
    presets = [_load(kind, p) for p in sorted(folder.glob("*.yaml"))]
    return tuple(sorted(presets, key=lambda p: (p.meta.get("order", 100), _size_key(p), p.title.lower())))


def _size_key(p: Preset) -> float:
    tier = str(p.meta.get("tier", "")).upper()
    try:
        return float(tier.rstrip("BM")) * (1e-3 if tier.endswith("M") else 1)
    except ValueError:
        return 0.0


def list_presets(kind: str, root: Path | None = None) -> list[Preset]:
    if kind not in KINDS:
        raise PresetError(f"unknown preset kind '{kind}': use one of {', '.join(KINDS)}")
    return list(_all(kind, str(root or PRESETS_DIR)))


def get(kind: str, key: str, root: Path | None = None) -> Preset:
    for p in list_presets(kind, root):
        if p.key == key or p.title == key:
            return p
    known = ", ".join(p.key for p in list_presets(kind, root))
    raise PresetError(f"no {kind} preset '{key}': known ones are {known}")


def apply(cfg: RunConfig, preset: Preset) -> RunConfig:
    """The run config with the preset's fields set (validated; a bad preset field names itself)."""
    try:
        return cfg.updated(preset.set)
    except ConfigError as e:
        raise PresetError(f"{preset.kind} preset '{preset.key}': {e}") from None


# ---- model presets -----------------------------------------------------------------------------------------------

def model_ids(preset: Preset) -> set[str]:
    ids = {preset.key, preset.get("hub_id"), preset.get("unsloth_id"), preset.set.get("model.name_or_path")}
    return {i for i in ids if i}


def find_model(name_or_path: str, root: Path | None = None) -> Preset | None:
    """The model preset for a preset key, hub id or Unsloth id (case-insensitive), or None."""
    want = name_or_path.strip().lower()
    for p in list_presets("models", root):
        if want in {i.lower() for i in model_ids(p)}:
            return p
    return None


def model_source(preset: Preset, device_kind: str, load_in_4bit: bool = True) -> str:
    """What to put in ``model.name_or_path`` for this preset on this device.

    On CUDA with a 4-bit base, Unsloth's pre-quantized copy: a quarter of the download, and not gated (the model's
    licence still applies). Elsewhere the original weights: a bitsandbytes 4-bit checkpoint cannot load without CUDA."""
    if device_kind == "cuda" and load_in_4bit and preset.get("unsloth_id"):
        return preset.get("unsloth_id")
    return preset.set.get("model.name_or_path") or preset.get("hub_id") or BUNDLED_MODEL


def apply_model(cfg: RunConfig, preset: Preset, device_kind: str) -> RunConfig:
    return cfg.updated({"model.name_or_path": model_source(preset, device_kind, cfg.model.load_in_4bit)})


# ---- batches ------------------------------------------------------------------------------------------------------

def effective_batch(cfg: RunConfig) -> int:
    return cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
