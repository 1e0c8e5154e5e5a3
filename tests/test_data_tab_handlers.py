"""The Data tab's handlers return {component: value} for the parts they change: called as Gradio calls them (no
browser), every part named is one of the event's outputs, and what a refused file leaves on the page is said."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.ui import data_tab
from studio.ui.app import Studio


def _tab(studio):
    with gr.Blocks() as app:
        data_tab.build(studio)
    return app


def _event(app, elem_id: str, name: str):
    return next(f for f in app.fns.values() if any(getattr(app.blocks.get(b), "elem_id", None) == elem_id and ev == name
                                                   for b, ev in f.targets))


def _call(block_fn, **given):
    """Call an event's function as Gradio does, each input at its current value or ``given[elem_id]`` (the loaded
    data: ``given["state"]``); what it returns names only the event's outputs."""
    args = [given.get(c.elem_id or "state", getattr(c, "value", None)) for c in block_fn.inputs]
    out = block_fn.fn(*args)
    assert out == gr.skip() or set(out) <= set(block_fn.outputs)
    return out if out == gr.skip() else {c.elem_id or "state": v for c, v in out.items()}


def test_a_refused_file_says_why_and_clears_the_views():
    app = _tab(Studio())
    out = _call(_event(app, "data-load", "click"), **{"data-path": "/etc/passwd"})
    assert out["data-summary"].startswith("**Cannot use this data:**")
    assert out["state"] is None and out["data-table"] is None and out["data-page"] == 1
    assert "data-desirable-weight" not in out  # the weights stay as they are
    # nothing loaded: paging, flipping and measuring change nothing
    assert _call(_event(app, "data-next", "click")) == gr.skip()
    assert _call(_event(app, "data-flip", "click"), **{"data-flip-rows": "1"}) == gr.skip()


def test_loading_the_sample_fills_every_view_and_flipping_keeps_the_rest(studio_home):
    from studio.config.run import BUNDLED_MODEL, SAMPLE_DATA

    studio = Studio()
    app = _tab(studio)
    out = _call(_event(app, "data-load", "click"),
                **{"data-path": SAMPLE_DATA, "data-model": BUNDLED_MODEL, "data-max-length": 256})
    wb = out["state"]
    assert wb is not None and isinstance(out["data-table"], pd.DataFrame) and len(out["data-table"])
    assert out["data-length-plot"] is not None and out["data-page"] == 1
    assert {"data-summary", "data-balance", "data-gauge", "data-map-prompt"} <= set(out)
    flipped = _call(_event(app, "data-flip", "click"), state=wb, **{"data-flip-rows": "1", "data-page": 1})
    assert flipped["state"] is wb and flipped["data-flip-rows"] == ""
    assert "data-length-plot" not in flipped  # the slow histogram is redrawn only when lengths are measured
