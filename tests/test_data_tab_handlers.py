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


def _labels(choices) -> list[str]:
    return [c[0] if isinstance(c, (list, tuple)) else c for c in choices]


def test_chat_ratings_load_with_their_own_columns_after_a_pairs_file(studio_home):
    """Issue 30, item 4: after a pairs file the mapping dropdowns hold 'chosen'/'rejected'; "Use my chat ratings"
    must read the ratings file with its own columns, not that mapping."""
    import json

    from studio.data import feedback

    pairs = studio_home / "data" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                             for i in range(4)))
    app = _tab(Studio())
    out = _call(_event(app, "data-load", "click"), **{"data-path": str(pairs), "data-model": ""})
    assert out["state"] is not None
    mapping = {f"data-map-{f}": out[f"data-map-{f}"]["value"] for f in ("prompt", "completion", "label", "chosen",
                                                                         "rejected", "messages")}
    assert mapping["data-map-chosen"] == "chosen" and mapping["data-map-rejected"] == "rejected"
    feedback.record("hello", "hi there", True, side="base")
    feedback.record("hello", "go away", False, side="base")
    rated = _call(_event(app, "data-use-ratings", "click"), **{"data-model": ""}, **mapping)
    assert rated["state"] is not None, rated["data-summary"]
    assert rated["state"].report.n_rows == 2 and rated["data-path"] == str(feedback.feedback_path())


def test_mapping_dropdowns_name_every_choice_and_the_message_points_up_to_them(studio_home):
    """Issue 30, item 9: the empty choice has words (an empty one shows as a lone "✓"), and the message points to
    the Column mapping box where it is: above the message."""
    odd = studio_home / "data" / "odd.jsonl"
    odd.parent.mkdir(parents=True, exist_ok=True)
    odd.write_text('{"a": "q", "b": "x", "c": "yes"}\n')
    app = _tab(Studio())
    out = _call(_event(app, "data-load", "click"), **{"data-path": str(odd), "data-model": ""})
    assert out["state"] is None and "Column mapping** above" in out["data-summary"]
    for f in ("prompt", "label", "chosen"):
        labels = _labels(out[f"data-map-{f}"]["choices"])
        assert all(label.strip() for label in labels) and {"a", "b", "c"} <= set(labels)
    built = [b for b in app.blocks.values() if getattr(b, "elem_id", "") == "data-map-prompt"][0]
    assert all(label.strip() for label in _labels(built.choices))


def test_a_broken_jsonl_offers_to_skip_the_bad_lines_and_lists_them(studio_home):
    """Issue 30, item 9: a broken JSONL is not all-or-nothing: the Data tab offers to skip the bad lines and lists
    them."""
    broken = studio_home / "data" / "broken.jsonl"
    broken.parent.mkdir(parents=True, exist_ok=True)
    good = '{"prompt": "q%d", "completion": "a%d", "label": %s}\n'
    broken.write_text(good % (1, 1, "true") + '{"prompt": "q2", "completion": \n' + good % (3, 3, "false")
                      + "[1, 2]\n" + good % (5, 5, "true"))
    app = _tab(Studio())
    given = {"data-path": str(broken), "data-model": ""}
    out = _call(_event(app, "data-load", "click"), **given)
    assert out["state"] is None and "line 2 is not valid JSON" in out["data-summary"]
    assert out["data-skip-bad"]["visible"] is True
    out = _call(_event(app, "data-skip-bad", "click"), **given)
    assert out["state"] is not None and out["state"].report.n_rows == 3
    assert "2 broken lines skipped (line 2, 4;" in out["data-summary"]
    assert out["data-skip-bad"]["visible"] is False
