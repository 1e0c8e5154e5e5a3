"""Model & preset tab: which model, how it is loaded, on which device."""
from __future__ import annotations

import gradio as gr

from studio import models
from studio.ui.widgets import collect, field_component

FIELDS = [("model", "name_or_path"), ("model", "backend"), ("model", "load_in_4bit")]


def device_markdown() -> str:
    d = models.detect_device()
    mem = f", {d.total_gib} GiB ({d.free_gib} free)" if d.total_gib else ""
    cc = f", compute capability {d.compute_capability}" if d.compute_capability else ""
    flags = ", ".join(f"{k}: {'yes' if getattr(d, k) else 'no'}" for k in ("unsloth", "bitsandbytes", "flash_attn"))
    notes = "".join(f"\n\n> {n}" for n in d.notes)
    return f"**Device:** {d.name} ({d.kind}{mem}{cc}; bf16: {'yes' if d.bf16 else 'no'})  \n{flags}{notes}"


def build(studio):
    gr.Markdown(device_markdown(), elem_id="device-info")
    comps = [field_component(studio.config, s, n) for s, n in FIELDS]
    msg = gr.Markdown()

    def apply(*values):
        try:
            cfg = studio.update(collect(FIELDS, values))
            return f"Model: `{cfg.model.name_or_path}`"
        except ValueError as e:
            return f"**{e}**"

    for c in comps:
        c.change(apply, comps, msg)
