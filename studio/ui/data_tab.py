"""Data tab: load a file (or the bundled sample), see what is in it, choose it for training."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from studio import data as data_mod
from studio.config import SAMPLE_DATA
from studio.data.normalize import DataError, completion_text


def _preview(rows, limit=200) -> pd.DataFrame:
    def text(v):
        s = completion_text(v)
        return s if len(s) < 300 else s[:300] + "…"

    return pd.DataFrame([{"prompt": text(r["prompt"]), "completion": text(r["completion"]), "label": r["label"]}
                         for r in rows[:limit]])


def build(studio):
    with gr.Row():
        upload = gr.File(label="Upload a data file (JSONL, JSON, CSV/TSV, Parquet)", file_count="single",
                         elem_id="data-upload")
        with gr.Column():
            path = gr.Textbox(label="…or a path / hub dataset id", value=studio.config.data.train_file,
                              info=f"'{SAMPLE_DATA}' is the small example set that ships with the studio.",
                              elem_id="data-path")
            load_btn = gr.Button("Load", variant="primary", elem_id="data-load")
    summary = gr.Markdown(elem_id="data-summary")
    table = gr.Dataframe(label="Rows (first 200)", interactive=False, wrap=True, elem_id="data-table")

    def load(file, source):
        src = file if file else (source or SAMPLE_DATA)
        try:
            norm = data_mod.load_kto(src)
        except DataError as e:
            return f"**Cannot use this data:** {e}", None, gr.update()
        n_pos = sum(r["label"] for r in norm.rows)
        n_neg = len(norm.rows) - n_pos
        studio.update({"data.train_file": src})
        conv = "".join(f"\n- {c}" for c in norm.conversions)
        msg = (f"**{len(norm.rows)} KTO rows**: {n_pos} desirable, {n_neg} undesirable. "
               f"Selected for training.{conv}")
        return msg, _preview(norm.rows), src

    load_btn.click(load, [upload, path], [summary, table, path])
    upload.upload(load, [upload, path], [summary, table, path])
