"""The Train tab's handlers, called directly (no browser, no training): each returns {part: value} for the parts of
the page it changes, and every part it names is one of its event's outputs."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from studio.config.run import RunConfig
from studio.runs.history import History
from studio.runs import folder
from studio.ui import train_tab as tt
from studio.ui.app import Studio


class FakeJob:
    def __init__(self, cfg: RunConfig, state="running", resume_from=None, events=None):
        self.id = f"job-{time.monotonic_ns()}"
        self.config = cfg
        self.state = state
        self.resume_from = resume_from
        self.events = list(events or [])
        self.backend = None
        self.error = None
        self.started_at = time.time() - 5
        self.ended_at = None if state in ("starting", "running") else time.time()
        self.run_dir = str(cfg.run_dir())

    @property
    def done(self):
        return self.state not in ("starting", "running", "stopping")

    def metrics(self):
        return [e for e in self.events if e["type"] == "metrics"]


class FakeEngine:
    """The engine's surface the tab uses; ``start`` records what it was asked instead of training."""

    def __init__(self):
        self.job = None
        self.on_event = None
        self.started: list[tuple[RunConfig, str | None]] = []

    @property
    def busy(self):
        return self.job is not None and not self.job.done

    def start(self, cfg, resume_from=None):
        self.started.append((cfg, resume_from))
        self.job = FakeJob(cfg, resume_from=resume_from)
        return self.job

    def stop(self):
        if not self.busy:
            return False
        self.job.state = "stopping"
        return True


@pytest.fixture()
def studio(tmp_path):
    cfg = RunConfig().updated({"output_dir": str(tmp_path / "runs")})
    return Studio(cfg, engine=FakeEngine(), history=History(tmp_path / "history.db"))


def form(cfg: RunConfig, **changes) -> list:
    """The form's field values (FIELDS' order) as the browser sends them, with ``changes`` ("train.max_steps": 3)."""
    values = {**tt.form_values(cfg), **changes}
    return [values[k] for k in tt.FORM_KEYS[1:]]


def recorded_run(studio, name="old", steps=3) -> str:
    """A finished run in the history, as the engine's events would leave it (no training)."""
    cfg = studio.config.updated({"name": name, "lora.r": 4})
    job = FakeJob(cfg, state="finished")
    for step in range(1, steps + 1):
        studio.history.record(job, {"type": "metrics", "step": step, "max_steps": steps, "loss": 0.7 - step / 100,
                                    "rewards/margins": step / 10, "epoch": step / steps})
    studio.history.record(job, {"type": "done", "state": "finished", "step": steps})
    return studio.history.run_for_job(job.id)


# ---- starting, resuming, stopping -------------------------------------------------------------------------------
def test_start_takes_the_form_and_names_a_new_run(studio):
    out = tt.start_run(studio, "  my-run ", form(studio.config, **{"train.max_steps": 7}))
    cfg, resume_from = studio.engine.started[-1]
    assert cfg.name == "my-run" and cfg.train.max_steps == 7 and resume_from is None
    assert out["name"] == "my-run" and out["message"].startswith("Started run `my-run`")
    assert studio.config.train.max_steps == 7
    assert studio.outside_changes == 0  # the form's own change: nothing to reload when the tab is shown


def test_start_refuses_a_setting_kto_cannot_use_and_keeps_the_name(studio):
    out = tt.start_run(studio, "run", form(studio.config, **{"train.per_device_train_batch_size": 1}))
    assert out["message"].startswith("**Not started:**") and "name" not in out
    assert studio.engine.started == []


def test_start_and_resume_say_a_job_is_running(studio):
    studio.engine.job = FakeJob(studio.config.updated({"name": "busy-one"}))
    for out in (tt.start_run(studio, "x", form(studio.config)),
                tt.resume_run(studio, "x", tt.LATEST, form(studio.config))):
        assert "a training job is running (`busy-one`)" in out["message"] and set(out) == {"message"}
    assert studio.engine.started == []


def test_resume_without_a_checkpoint_says_so(studio):
    before = studio.config
    out = tt.resume_run(studio, "nothing-here", tt.LATEST, form(studio.config))
    assert out == {"message": "**Nothing to resume:** run `nothing-here` has no saved checkpoint yet."}
    assert studio.config == before and studio.engine.started == []


def test_resume_keeps_the_saved_adapter_shape_and_goes_through_the_studio(studio):
    saved = studio.config.updated({"name": "r1", "lora.r": 4, "lora.lora_alpha": 8})
    run_dir = saved.run_dir()
    (run_dir / "checkpoint-2").mkdir(parents=True)
    saved.save(run_dir / folder.CONFIG_FILE)
    out = tt.resume_run(studio, "r1", tt.LATEST, form(studio.config, **{"lora.r": 16, "train.max_steps": 9}))
    cfg, resume_from = studio.engine.started[-1]
    assert cfg.lora.r == 4 and cfg.train.max_steps == 9 and resume_from == tt.LATEST
    assert "LoRA settings stay as saved (r=4, lora_alpha=8)" in out["message"]
    assert studio.config == cfg  # set through Studio.replace, as the form's own change
    assert studio.outside_changes == 0


def test_stop(studio):
    assert tt.stop_run(studio) == {"message": "No training is running."}
    studio.engine.start(studio.config)
    assert tt.stop_run(studio)["message"].startswith("Stopping after this step")


# ---- the history ------------------------------------------------------------------------------------------------
def test_open_loads_a_run_into_the_form_and_the_studio(studio):
    assert tt.open_run(studio, None) == {"message": "Pick a run first."}
    run_id = recorded_run(studio, "old")
    out = tt.open_run(studio, run_id)
    assert out["name"] == "old" and out["lora.r"] == 4 and out["compare_a"] == run_id
    assert out["checkpoint"]["value"] == tt.LATEST and "`old`" in out["detail"]
    assert set(tt.FORM_KEYS) <= set(out)
    assert studio.config.name == "old" and studio.config.lora.r == 4 and studio.outside_changes == 0


def test_delete_asks_first_and_keeps_the_record(studio):
    run_id = recorded_run(studio, "gone")
    Path(studio.history.get(run_id)["run_dir"]).mkdir(parents=True)
    assert tt.delete_run(studio, None, True) == {"message": "Pick a run first.", "confirm": False}
    assert "Tick **yes" in tt.delete_run(studio, run_id, False)["message"]
    out = tt.delete_run(studio, run_id, True)
    assert out["message"].startswith("Deleted") and out["confirm"] is False and "files deleted" in out["detail"]
    assert studio.history.get(run_id) is not None


def test_compare_is_empty_until_runs_are_picked(studio):
    assert tt.compare_runs(studio, None, None, "loss") == {"compare": None}
    run_id = recorded_run(studio)
    frame = tt.compare_runs(studio, run_id, None, None)["compare"]
    assert list(frame["step"]) == [1, 2, 3] and frame["series"].iloc[0].startswith("A: old")


# ---- the timer --------------------------------------------------------------------------------------------------
def test_tick_sends_only_what_changed(studio):
    first = tt.tick(studio, None, "run", tt.LATEST)
    assert "No run yet" in first["status"]
    assert all(first[k] is None for k in tt.PLOT_KEYS.values())  # empty charts: nothing logged
    assert first["run"]["choices"] == [] and first["stop"]["interactive"] is False
    again = tt.tick(studio, first["seen"], "run", tt.LATEST)
    assert set(again) == {"seen"}  # nothing happened: nothing is redrawn

    job = studio.engine.start(studio.config)
    job.events.append({"type": "metrics", "step": 1, "max_steps": 5, "loss": 0.69, "epoch": 0.2, "time": time.time()})
    running = tt.tick(studio, again["seen"], "run", tt.LATEST)
    assert running["stop"]["interactive"] is True and "training" in running["status"]
    assert list(running["plot-loss"]["step"]) == [1] and running["plot-kl"] is None
    # the same events a second later: only the moving clock is redrawn
    later = tt.tick(studio, running["seen"], "run", tt.LATEST, now=time.time() + 1)
    assert set(later) == {"progress", "seen"}


def test_tick_offers_the_checkpoints_of_the_named_run(studio):
    first = tt.tick(studio, None, "mine", "gone")
    assert first["checkpoint"]["value"] == tt.LATEST
    (tt.run_dir_for(studio, "mine") / "checkpoint-4").mkdir(parents=True)
    out = tt.tick(studio, first["seen"], "mine", tt.LATEST)
    assert [label for label, _ in out["checkpoint"]["choices"]] == ["latest (checkpoint-4)", "checkpoint-4"]


# ---- the form ---------------------------------------------------------------------------------------------------
def test_edits_go_into_the_config_and_an_invalid_one_waits(studio, monkeypatch):
    monkeypatch.setattr(tt, "duration_markdown", lambda cfg, card=None: f"steps {cfg.train.max_steps}")
    assert tt.edit_field(studio, "train", "max_steps", 12.0) == {"expected": "steps 12"}
    assert studio.config.train.max_steps == 12 and studio.outside_changes == 0
    assert tt.edit_field(studio, "train", "per_device_train_batch_size", 1) == {}
    assert studio.config.train.per_device_train_batch_size != 1


def test_epochs_typed_as_a_number_or_auto_round_trip_through_the_form(studio, monkeypatch):
    """num_train_epochs is a number or 'auto' (a one-line textbox): '2' is 2 passes and shows as 2, not 2.0."""
    monkeypatch.setattr(tt, "duration_markdown", lambda cfg, card=None: "")
    assert tt.form_values(studio.config)["train.num_train_epochs"] == "auto"  # the default
    tt.edit_field(studio, "train", "num_train_epochs", "2")
    assert studio.config.train.num_train_epochs == 2.0
    assert tt.form_values(studio.config)["train.num_train_epochs"] == "2"
    tt.edit_field(studio, "train", "num_train_epochs", "2.5")
    assert tt.form_values(studio.config)["train.num_train_epochs"] == 2.5
    tt.edit_field(studio, "train", "num_train_epochs", "auto")
    assert studio.config.train.num_train_epochs == "auto"
    assert tt.edit_field(studio, "train", "num_train_epochs", "0") == {}  # invalid: waits for Start, which says why
    assert studio.config.train.num_train_epochs == "auto"
    out = tt.start_run(studio, "run", form(studio.config, **{"train.num_train_epochs": "x"}))
    assert out["message"].startswith("**Not started:**") and "num_train_epochs" in out["message"]
    tt.start_run(studio, "ep", form(studio.config, **{"train.num_train_epochs": "3"}))
    assert studio.engine.started[-1][0].train.num_train_epochs == 3.0


def test_showing_the_tab_reloads_only_after_another_tab_changed_the_config(studio):
    loaded = tt.load_form(studio)
    assert loaded["name"] == studio.config.name and loaded["seen_changes"] == studio.outside_changes
    assert tt.show_form(studio, loaded["seen_changes"]) == {}
    studio.update({"kto.max_length": 256})  # e.g. the Model tab's auto-fit
    out = tt.show_form(studio, loaded["seen_changes"])
    assert out["kto.max_length"] == 256 and out["message"] == tt.RELOADED_NOTICE
    assert "name" not in out  # a name being typed is never overwritten
    assert out["seen_changes"] == studio.outside_changes


def test_a_new_page_shows_the_running_jobs_settings(studio):
    studio.engine.start(studio.config.updated({"name": "live", "train.max_steps": 5}))
    studio.update({"train.max_steps": 99}, source="train-form")
    assert tt.page_form(studio)["name"] == "live" and tt.page_form(studio)["train.max_steps"] == 5


# ---- the wiring -------------------------------------------------------------------------------------------------
def test_every_part_a_handler_returns_is_an_output_of_its_event(studio, monkeypatch):
    """Built in a Blocks (no server): each event's handler, called as Gradio calls it, returns components of its
    own outputs, or gr.skip() where nothing changes."""
    monkeypatch.setattr(tt, "duration_markdown", lambda cfg, card=None: "expected")
    with gr.Blocks() as app:
        with gr.Tab("Train") as tab:
            tt.build(studio, app=app, tab=tab)
    run_id = recorded_run(studio)
    assert len(app.fns) >= len(tt.FIELDS) + 10
    for block_fn in app.fns.values():
        args = [run_id if c.elem_id == "history-run" else c.value for c in block_fn.inputs]
        out = block_fn.fn(*args)
        assert out == gr.skip() or set(out) <= set(block_fn.outputs), block_fn.name


def test_the_held_out_accuracy_chart_draws_100_percent_inside_its_frame():
    """Held-out checks of a first run that learns sit at 100%: with the axis fitted to the data they were drawn on
    the chart's top edge, where they are hard to see."""
    import gradio as gr

    from studio.ui.app import Studio, build_app

    app = build_app(Studio())
    plots = {b.elem_id: b for b in app.blocks.values() if isinstance(b, (gr.LinePlot, gr.ScatterPlot))}
    accuracy = plots["plot-heldout-accuracy"]
    low, high = accuracy.y_lim
    assert low == 0 and high > 1
    assert plots["plot-loss"].y_lim is None  # the other curves keep a fitted axis
