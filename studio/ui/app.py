"""Builds the Gradio app: the shared studio state and the four tabs."""
from __future__ import annotations

import threading

import gradio as gr

from studio.config.run import RunConfig
from studio.training.engine import Engine
from studio.runs.history import History


class Studio:
    """Server-side state shared by every browser tab: the run config being edited and the one training engine.

    A desktop studio has one user and one GPU, so refreshing the page or opening a second tab shows the same
    config and the same running job instead of a blank form."""

    def __init__(self, config: RunConfig | None = None, engine: Engine | None = None,
                 history: History | None = None):
        self.config = config or RunConfig()
        self.history = history or History()
        self.engine = engine or Engine(on_event=self.history.record)
        if self.engine.on_event is None:
            self.engine.on_event = self.history.record
        self.lock = threading.Lock()
        # counts changes made outside the Train tab's form (Model tab auto-fit, presets, Data tab): the form reloads
        # from the config when it is shown after such a change, and only then (a reload would race with typing)
        self.outside_changes = 0
        self.card: str | None = None  # the Model tab's card (GPU preset key), shared by every browser tab
        self.recipe: str = "standard"
        # the pending run's version: every user choice takes a new one (``begin``) and every direct change makes a
        # new one, so a slow handler's result that arrives after a newer choice is dropped (``apply``), never
        # written over it
        self.version = 0

    def begin(self) -> int:
        """A new user choice starts: its version. Results of handlers that started before it are now stale."""
        with self.lock:
            self.version += 1
            return self.version

    def current(self, version: int) -> bool:
        return version == self.version

    def apply(self, cfg: RunConfig, version: int) -> bool:
        """Set the config a handler computed for the choice of ``version``; False (nothing set) when a newer choice
        or change came since: the newer one wins."""
        with self.lock:
            if version != self.version:
                return False
            if cfg != self.config:
                self.config = cfg
                self.outside_changes += 1
            return True

    def update(self, changes: dict, source: str | None = None) -> RunConfig:
        with self.lock:
            self.config = self.config.updated(changes)
            self.version += 1  # a newer change: results still being computed from the old config are dropped
            if source != "train-form":
                self.outside_changes += 1
            return self.config

    def replace(self, cfg: RunConfig, source: str | None = None) -> RunConfig:
        """Set a whole config: a planned one (the Model tab's card / model / recipe plan, an outside change), or one
        the Train tab's form shows already (a run opened from the history or resumed: ``source="train-form"``)."""
        with self.lock:
            self.config = cfg
            self.version += 1
            if source != "train-form":
                self.outside_changes += 1
            return cfg


# Gradio's status tracker tells screen readers that an event finished with the i18n key "common.complete", which its
# English strings lack (gradio 6.x), so the raw key was written into the page (a hidden live region, read aloud and
# found by page search). The studio supplies the word; pass it to ``launch(i18n=I18N)``.
I18N = gr.I18n(en={"common.complete": "Complete"})

CSS = """
#studio-title h1 {margin-bottom: 0}
.metric-plot {min-height: 220px}
@keyframes studio-slide {from {margin-left: 0} to {margin-left: 70%}}
.studio-indeterminate {animation: studio-slide 1.6s ease-in-out infinite alternate}
"""


def other_apps_warning(others: list[dict], home) -> str | None:
    """What to tell when other apps serve the same studio home (``studio.runs.lock.other_apps``); None when none."""
    if not others:
        return None
    listed = "; ".join(f"process {o.get('pid', '?')} at {o.get('url') or '?'} (since {o.get('claimed', '?')})"
                       for o in others)
    return (f"Another KTO Studio already serves this studio home ({home}): {listed}. Both show the same runs: a run "
            "started in either is live in both, and either's Stop stops it; two runs at once would share this "
            "machine. Use that app, or start this one with another KTO_STUDIO_HOME.")


def _others_markdown() -> str:
    from studio import paths
    from studio.runs import lock

    text = other_apps_warning(lock.other_apps(), paths.home())
    return f"⚠️ {text}" if text else ""


def build_app(studio: Studio | None = None) -> gr.Blocks:
    from studio.ui import ab_tab, chat_tab, data_tab, model_tab, train_tab

    studio = studio or Studio()
    with gr.Blocks(title="KTO Studio") as app:
        gr.Markdown("# KTO Studio\nKTO preference fine-tuning on your own GPU (or CPU): "
                    "**Data → Model & preset → Train → Chat**.", elem_id="studio-title")
        others = gr.Markdown("", elem_id="other-apps")  # said when the page loads: apps come and go
        app.load(_others_markdown, outputs=others, show_progress="hidden")
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data_tab.build(studio)
            with gr.Tab("Model & preset", id="model") as model:
                model_tab.build(studio, tab=model)
            with gr.Tab("Train", id="train") as train:
                train_tab.build(studio, tab=train)
            with gr.Tab("Chat", id="chat"):
                with gr.Tabs():
                    with gr.Tab("Side by side", id="chat-side") as side:
                        chat_tab.build(studio, tab=side)
                    with gr.Tab("A/B (blind)", id="chat-ab"):
                        ab_tab.build(studio)
    app.studio = studio
    return app
