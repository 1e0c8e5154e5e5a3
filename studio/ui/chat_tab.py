"""Chat tab: base vs tuned, side by side."""
from __future__ import annotations

import gradio as gr


def build(studio):
    gr.Markdown("Train a run first; then chat with the base model and the tuned adapter side by side here.")
