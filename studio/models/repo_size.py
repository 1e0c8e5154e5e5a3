"""How much downloading a hub repo fetches, counted from its architecture (nothing is fetched): the Model tab's
"about N GB to download" for the repo the chosen card actually loads (the 16-bit repo or its 4-bit copy).

Apart from ``hub`` so that the hub module (downloads, the cache, online or not) need not import the architecture
reader, which itself asks ``hub`` whether the hub can be reached.
"""
from __future__ import annotations

from dataclasses import dataclass

from studio.models.hub import is_hub_id


@dataclass(frozen=True)
class DownloadSize:
    repo_id: str
    bytes: float
    four_bit: bool  # a pre-quantized bitsandbytes 4-bit repo

    @property
    def gb(self) -> float:
        return self.bytes / 1e9

    def describe(self) -> str:
        return f"about {self.gb:.1f} GB to download (`{self.repo_id}`{', stored in 4 bits' if self.four_bit else ''})"




def download_size(repo_id: str) -> DownloadSize | None:
    """About how much downloading ``repo_id`` fetches: its weights as that repo stores them, counted from the
    architecture (a model preset's config, else config.json in the HF cache; nothing is fetched). A pre-quantized
    bitsandbytes 4-bit repo (a preset's 4-bit copy, or a config whose quantization_config loads in 4 bits) stores
    its linear layers in NF4, a quarter of the 16-bit repo's bytes; any other repo stores every weight in its
    config's dtype (16-bit unless it says float32). None when the architecture is unknown."""
    from studio.config import presets
    from studio.models.arch import Arch, EstimateError, model_config

    if not is_hub_id(repo_id):  # the bundled model ships with the studio; a local folder is already here
        return None
    try:
        config, _ = model_config(repo_id, fetch=False)
        arch = Arch.from_config(config, name=repo_id)
    except (EstimateError, OSError, ValueError):
        return None
    preset = presets.find_model(repo_id)
    quant = config.get("quantization_config") or {}
    four_bit = bool((preset is not None and str(preset.get("unsloth_id") or "").lower() == repo_id.lower())
                    or quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type"))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return DownloadSize(repo_id, arch.stored_bytes(four_bit, 4 if dtype == "float32" else 2), four_bit)
