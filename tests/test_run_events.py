"""Issue 29: the run folder is the interface to training. The trainer appends typed events to the run folder's
events.jsonl; any viewer (the Train tab of this or a second app, the CLI, the history) renders from that file; Stop is
a request file in the run folder the trainer turns into a checkpoint and the adapter (`python -m studio stop RUN`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from studio.runs import folder, live, lock as runlock
from studio.training.engine import Engine
from tests.conftest import ROOT, tiny_run_config, wait_for
from tests.test_run_folder import FakeTrainer

WAIT = 1800  # a shared, busy 2-core CPU can take minutes per step


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / folder.EVENTS_FILE).read_text().splitlines()]


def test_the_trainer_writes_its_typed_events_to_the_run_folder_and_a_viewer_renders_from_them(tmp_path, monkeypatch):
    monkeypatch.setattr(Engine, "_build", lambda self, job: FakeTrainer(self, job))
    cfg = tiny_run_config(tmp_path, **{"train.max_steps": 3})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(120)
    assert job.state == "finished", job.error
    events = _lines(cfg.run_dir())
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "done"
    assert {"status", "metrics", "health"} <= set(types)
    assert all(isinstance(e["time"], float) and e["state"] for e in events)  # typed, timed, with the job's state
    assert events[0]["job_id"] == job.id and events[0]["run_dir"] == str(cfg.run_dir())
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3]
    assert events[-1]["state"] == "finished" and events[-1]["adapter"] == job.adapter_path
    # a viewer in any process: the same run, from the file alone
    view = live.RunView(cfg.run_dir())
    assert view.state == "finished" and view.done and view.id == job.id
    assert [m["step"] for m in view.metrics()] == [1, 2, 3] and view.adapter_path == job.adapter_path
    assert not view.live and not runlock.held(cfg.run_dir())
    # a resume from checkpoint-1 is a new attempt in the same log: the curve forks at the checkpoint
    for later in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(cfg.run_dir() / later)
    job2 = engine.start(cfg.updated({"train.max_steps": 4}), resume_from=str(cfg.run_dir() / "checkpoint-1"))
    engine.wait(120)
    assert job2.state == "finished", job2.error
    view.refresh()
    assert view.id == job2.id and view.resume_from.endswith("checkpoint-1")
    assert [m["step"] for m in view.metrics()] == [1, 2, 3, 4]
    assert [e["type"] for e in view.events][0] == "started" and len(view.all_events) > len(view.events)


def test_an_older_run_folder_without_an_event_log_is_read_from_its_metrics(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / folder.METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    view = live.RunView(run)
    assert [m["step"] for m in view.metrics()] == [1, 2] and not view.has_log and view.done
    assert folder.read_events(run) == ([], 0)


def test_a_line_being_written_is_left_for_the_next_read(tmp_path):
    folder.append_event(tmp_path, {"type": "status", "time": 1.0, "message": "a"})
    with open(tmp_path / folder.EVENTS_FILE, "a") as f:
        f.write('{"type": "metrics", "st')  # the trainer is mid-write
    events, offset = folder.read_events(tmp_path)
    assert [e["message"] for e in events] == ["a"]
    with open(tmp_path / folder.EVENTS_FILE, "a") as f:
        f.write('ep": 1, "time": 2.0}\n')
    more, _ = folder.read_events(tmp_path, offset)
    assert [e["step"] for e in more] == [1]


def test_cli_stop_stops_a_cpu_run_trained_by_another_process(tmp_path, studio_home, tiny_model_dir):
    """`python -m studio train` in one process, watched from this one through the run folder alone (live, curves
    from step 1), stopped by `python -m studio stop RUN`: a checkpoint and the adapter, state 'stopped'."""
    # the run folder's story, not the model's: a tiny random model, with steps enough to outlast the stop
    cfg = tiny_run_config(tmp_path, name="stoppable", output_dir=None,
                          **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 5000,
                             "train.save_steps": 1000, "kto.precompute_ref_log_probs": False, "kto.max_length": 64,
                             "data.eval_fraction": 0.0})
    yaml_path = tmp_path / "run.yaml"
    cfg.save(yaml_path)
    env = dict(os.environ, KTO_STUDIO_HOME=str(studio_home))
    nothing = subprocess.run([sys.executable, "-m", "studio", "stop", "stoppable"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 2 and "no run 'stoppable'" in nothing.stderr
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", str(yaml_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = studio_home / "runs" / "stoppable"
    try:
        assert wait_for(lambda: folder.has_events(run_dir), timeout=WAIT)
        view = live.RunView(run_dir)
        assert wait_for(lambda: view.refresh().metrics() or proc.poll() is not None, timeout=WAIT, every=0.5)
        assert proc.poll() is None, proc.stderr.read()
        assert view.live and view.state == "running" and view.metrics()[0]["step"] == 1  # curves from step 1
        stop = subprocess.run([sys.executable, "-m", "studio", "stop", "stoppable", "--wait", "--timeout",
                               str(WAIT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT + 60)
        assert stop.returncode == 0, stop.stderr
        assert "stop requested" in stop.stderr and stop.stdout.startswith("stopped:")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    view.refresh()
    assert view.state == "stopped" and not view.live
    step = view.events[-1]["step"]
    assert 1 <= step < 5000
    assert folder.is_adapter_dir(run_dir / "adapter")
    assert [s for s, _ in folder.run_checkpoints(run_dir)] == [step]  # the stop saved a resumable checkpoint
    assert not folder.stop_requested(run_dir)  # the request was honoured and cleared
    again = subprocess.run([sys.executable, "-m", "studio", "stop", str(run_dir)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not training (stopped)" in again.stderr


def test_a_killed_trainer_reads_interrupted_in_the_history_and_the_train_tab_and_resume_continues(
        tmp_path, studio_home, tiny_model_dir):
    """SIGKILL the process training a CPU run (the app killed mid-run): a restarted app's history and Train tab show
    the run as interrupted, not running, and Resume continues it from its last checkpoint."""
    import signal

    from studio.runs.history import History
    from studio.ui import train_tab as tt
    from studio.ui.app import Studio

    cfg = tiny_run_config(tmp_path, name="killed", output_dir=None,
                          **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 5000, "train.save_steps": 1,
                             "kto.precompute_ref_log_probs": False,
                             "kto.max_length": 64, "data.eval_fraction": 0.0})
    yaml_path = tmp_path / "run.yaml"
    cfg.save(yaml_path)
    env = dict(os.environ, KTO_STUDIO_HOME=str(studio_home))
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", str(yaml_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = studio_home / "runs" / "killed"
    try:
        assert wait_for(lambda: folder.run_checkpoints(run_dir) or proc.poll() is not None, timeout=WAIT, every=0.5)
        assert proc.poll() is None, proc.stderr.read()
        assert History().runs()[0]["status"] in ("running", "stopping")  # live: another process trains it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not runlock.held(run_dir)  # the kernel let go with the process

    history = History()  # the restarted app's
    [run] = [r for r in history.runs() if r["name"] == "killed"]
    assert run["status"] == "interrupted" and "Resume" in run["error"]
    saved = folder.read_config(run_dir)
    studio = Studio(saved, history=history)
    shown = tt.watched(studio)
    assert shown.state == "interrupted" and shown.done and not shown.live
    page = tt.tick(studio, None, "killed", tt.LATEST)
    assert "interrupted" in page["status"] and page["stop"]["interactive"] is False  # no viewer waits on it
    assert "interrupted" in list(page["history"]["status"])

    latest = folder.run_checkpoints(run_dir)[-1][0]
    values = {**tt.form_values(saved), "train.max_steps": latest + 1}
    out = tt.resume_run(studio, "killed", tt.LATEST, [values[k] for k in tt.FORM_KEYS[1:]])
    assert out["message"].startswith("Resuming `killed`"), out["message"]
    job = studio.engine.wait(WAIT)
    assert job.state == "finished", job.error
    view = live.RunView(run_dir)
    assert view.state == "finished" and view.resume_from.endswith(f"checkpoint-{latest}")
    steps = [m["step"] for m in view.metrics() if "loss" in m]
    assert steps == list(range(1, latest + 2))  # one curve: the killed attempt's steps, then the resumed one's
    assert history.get(run["id"])["status"] == "finished"


def test_an_exception_inside_the_trainer_fails_the_run_with_its_reason_and_the_app_keeps_serving(
        tmp_path, tiny_model_dir):
    """An exception raised in a trainer callback mid-run (a real KTOTrainer on the CPU): the run ends 'failed' with
    error.log and a plain reason, in the engine, the event log and the Train tab; the model is released; the next
    request is answered."""
    import gc
    import weakref

    from transformers import TrainerCallback

    from studio.runs.history import History
    from studio.ui import train_tab as tt
    from studio.ui.app import Studio

    seen = {}

    class Faulty(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["model"] = weakref.ref(model)

        def on_step_end(self, args, state, control, **kw):
            raise RuntimeError("injected fault in a callback at step %d" % state.global_step)

    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 5,
                                       "kto.precompute_ref_log_probs": False, "kto.max_length": 64,
                                       "data.eval_fraction": 0.0})
    studio = Studio(cfg, history=History(tmp_path / "history.sqlite"))
    studio.engine.extra_callbacks.append(Faulty())
    job = studio.engine.start(cfg)
    studio.engine.wait(WAIT)
    assert job.state == "failed" and not studio.engine.busy
    assert job.error.startswith("RuntimeError: injected fault in a callback at step 1") and "error.log" in job.error
    assert "injected fault" in folder.read_error(cfg.run_dir()) and "Traceback" in folder.read_error(cfg.run_dir())
    view = live.RunView(cfg.run_dir())
    assert view.state == "failed" and view.error == job.error and not view.live
    assert [e["type"] for e in view.events if e["type"] != "memory"][-2:] == ["error", "done"]
    # a model the failure kept alive (its traceback's frames) is emptied before 'done': say who held it
    print("memory events:", [e for e in view.events if e["type"] == "memory"])
    # the model, optimizer and caches were released at the run's end (the engine's gc, before this test's)
    assert seen["model"]() is None
    # the app answers the next request: the Train tab shows the failure and its reason; the history has it
    page = tt.tick(studio, None, cfg.name, tt.LATEST)
    assert "failed" in page["status"] and "injected fault" in page["status"]
    assert studio.history.runs()[0]["status"] == "failed" and "injected fault" in studio.history.runs()[0]["error"]
    assert tt.stop_run(studio) == {"message": "No training is running."}
    gc.collect()


HELD = []  # something outside the engine (a library cache, a callback) that keeps the run's model


def _run_with_model(tmp_path, monkeypatch, make_model, steps: int):
    """A run of the fake trainer whose job's model is ``make_model()`` (held only weakly by the engine): the finished
    job and its config."""
    import weakref

    def build(self, job):
        model = make_model()
        job.model_ref = weakref.ref(model)
        return FakeTrainer(self, job)

    monkeypatch.setattr(Engine, "_build", build)
    cfg = tiny_run_config(tmp_path, **{"train.max_steps": steps})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(120)
    assert job.state == "finished", job.error
    return job, cfg


def test_a_model_still_held_after_the_run_is_emptied_in_place_and_said_who_held_it(tmp_path, monkeypatch):
    """The trainer is gone but a module-level list still holds the run's model: at the run's end the engine empties
    every parameter and buffer in place (its memory goes back, on an 8 GB card it decides what fits next), names the
    holder in the run folder's events, and the run keeps its result."""
    import torch

    def make():
        model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 1000))
        model.register_buffer("scale", torch.ones(1000))
        HELD.append(model)
        return model

    try:
        job, cfg = _run_with_model(tmp_path, monkeypatch, make, steps=2)
        held = HELD[0]
        assert all(t.numel() == 0 for t in [*held.parameters(), *held.buffers()])
        assert held[1].weight.dtype == torch.float32  # hollow, not retyped: whoever holds it sees an empty module
        memory = [e for e in _lines(cfg.run_dir()) if e["type"] == "memory"]
        assert len(memory) == 1
        want = (1000 * 64 * 2 + 1000 + 1000) * 4 / 2**20
        assert memory[0]["emptied_mib"] == pytest.approx(want, abs=0.1)
        assert any("list" in chain for chain in memory[0]["holders"]), memory[0]["holders"]
        assert live.RunView(cfg.run_dir()).state == "finished"
        assert job.model_ref is None
    finally:
        HELD.clear()


def test_a_model_nobody_holds_is_not_touched_and_no_memory_event_is_written(tmp_path, monkeypatch):
    import torch

    kept = {}

    def make():
        model = torch.nn.Linear(8, 8)
        kept["weight"] = model.weight  # a tensor alone, not the model: the model itself is let go
        return model

    job, cfg = _run_with_model(tmp_path, monkeypatch, make, steps=1)
    assert kept["weight"].numel() == 64
    assert not [e for e in _lines(cfg.run_dir()) if e["type"] == "memory"]


def test_bitsandbytes_optimizer_registry_lets_go_of_the_runs_embedding(tmp_path, monkeypatch):
    """Measured on the GPU: each finished run left its embedding matrix allocated (256 MiB for Mistral-7B, 1 GiB for
    Llama-3.1-8B), held by bitsandbytes' process-wide optimizer registry, where the HF Trainer registers every
    nn.Embedding when it builds an 8-bit optimizer. The engine drops what the run registered; what was there before
    the run stays."""
    import weakref

    import torch
    from bitsandbytes.optim import GlobalOptimManager

    mgr = GlobalOptimManager.get_instance()
    earlier = torch.nn.Embedding(10, 4)
    mgr.register_module_override(earlier, "weight", {"optim_bits": 32})  # someone else's, before the run
    embeddings = []

    def make():
        model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 1000))
        for module in model.modules():  # what transformers.Trainer.create_optimizer does for an 8-bit optimizer
            if isinstance(module, torch.nn.Embedding):
                mgr.register_module_override(module, "weight", {"optim_bits": 32})
                mgr.override_config(module.weight, "optim_bits", 32)
        embeddings.append(weakref.ref(model[0]))
        return model

    try:
        job, cfg = _run_with_model(tmp_path, monkeypatch, make, steps=1)
        import gc

        gc.collect()
        assert embeddings[0]() is None, "the run's embedding is still alive"
        assert [m for m, _, _ in mgr.module_weight_config_triple] == [earlier]
        assert not [e for e in _lines(cfg.run_dir()) if e["type"] == "memory"]  # nothing needed emptying
    finally:
        mgr.module_weight_config_triple[:] = [t for t in mgr.module_weight_config_triple if t[0] is not earlier]
