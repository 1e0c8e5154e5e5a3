"""The Model tab's plan text: a note several paths' estimates share is said once (issue 16 point 5)."""
from __future__ import annotations

from tests.conftest import unsloth_only_8b
from studio.config.run import RunConfig
from studio.models.load import DeviceInfo
from studio.training import plan as planner
from studio.ui.model_tab import plan_markdown, plan_notes

NO_UNSLOTH = DeviceInfo(kind="cpu", name="test CPU")


def test_a_plan_that_applies_no_path_says_the_gradients_note_once(tmp_path):
    # an 8B with a 256k vocabulary on 8 GB: bitsandbytes (what is installed) does not fit, Unsloth would; both
    # estimates micro-batch, each with its own row count
    p = planner.plan(RunConfig().updated({"model.name_or_path": unsloth_only_8b(tmp_path)}), "8gb", NO_UNSLOTH)
    plan = p.card_plan
    assert plan.path is None and plan.fits["unsloth"].ok and not plan.fits["bnb"].ok
    assert sum("Gradients are taken" in n for e in plan.estimates.values() for n in e.notes) == 2
    text = plan_markdown(plan, True, unsloth_installed=False)
    assert text.count("Gradients are taken") == 1, text
    # the one said is the plan that fits (Unsloth's, offered as "with Unsloth installed you could")
    assert "pairs all 16 rows" in text and "pairs all 2 rows" not in text


def test_the_applied_path_says_its_own_notes():
    p = planner.plan(RunConfig(), "8gb", NO_UNSLOTH, model_key="mistral-7b-instruct-v0.3")
    assert p.card_plan.path == "bnb"
    assert plan_notes(p.card_plan) == p.card_plan.estimates["bnb"].notes


def test_the_tabs_handlers_return_only_their_own_outputs(monkeypatch):
    """Built in a Blocks (no browser): choosing a card, a model or a recipe, and a page load, each return
    {component: value} for components of their event's outputs; the card's plan reaches the fields."""
    import gradio as gr

    from studio.ui import model_tab
    from studio.ui.app import Studio

    monkeypatch.setattr(model_tab.models, "detect_device", lambda: NO_UNSLOTH)
    studio = Studio()
    with gr.Blocks() as app:
        model_tab.build(studio)
    by_trigger = {getattr(app.blocks.get(b), "elem_id", None) or ev: f for f in app.fns.values()
                  for b, ev in f.targets}
    given = {"gpu-preset": "8gb", "model-preset": "mistral-7b-instruct-v0.3", "recipe-preset": "standard",
             "seq-ceiling": 4096}
    for trigger in ("gpu-preset", "model-preset", "recipe-preset", "load"):
        f = by_trigger[trigger]
        out = f.fn(*[given.get(c.elem_id, c.value) for c in f.inputs])
        assert set(out) <= set(f.outputs), trigger
        shown = {c.elem_id: v for c, v in out.items()}
        assert "Budget: 7.5 GiB" in shown["fit-settings"], trigger
        if "cfg-model-name_or_path" in shown:
            assert shown["cfg-model-name_or_path"] == studio.config.model.name_or_path


def test_the_download_size_shown_is_the_repo_the_card_loads(monkeypatch):
    """Issue 27 point 4: on an 8 GB card the studio loads Unsloth's 4-bit copy, but the tab said "about 15.2 GB to
    download" (the 16-bit repo's size). Choosing the card, the model or a page load shows the chosen repo's size."""
    import gradio as gr

    from studio.ui import model_tab
    from studio.ui.app import Studio

    monkeypatch.setattr(model_tab.models, "detect_device", lambda: NO_UNSLOTH)
    studio = Studio()
    with gr.Blocks() as app:
        model_tab.build(studio)
    by_trigger = {getattr(app.blocks.get(b), "elem_id", None) or ev: f for f in app.fns.values()
                  for b, ev in f.targets}

    def shown(trigger, **given):
        f = by_trigger[trigger]
        out = f.fn(*[given.get(c.elem_id, c.value) for c in f.inputs])
        return {c.elem_id: v for c, v in out.items()}["preset-info"]

    model = {"model-preset": "qwen2.5-7b-instruct", "recipe-preset": "standard", "seq-ceiling": 4096}
    gpu = shown("model-preset", **model, **{"gpu-preset": "8gb"})
    assert studio.config.model.name_or_path == "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"
    assert "about 5.5 GB to download (`unsloth/Qwen2.5-7B-Instruct-bnb-4bit`" in gpu and "15.2 GB" not in gpu
    assert "15.2 GB to download (`Qwen/Qwen2.5-7B-Instruct`)" in shown("gpu-preset", **model, **{"gpu-preset": "cpu"})
    assert studio.config.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    shown("gpu-preset", **model, **{"gpu-preset": "8gb"})
    assert "5.5 GB" in shown("load", **{"seq-ceiling": 4096})
