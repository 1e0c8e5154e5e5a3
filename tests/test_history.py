"""The run history remembers every run: config, status, timestamps, curves, checkpoints, adapter, errors.

One real CPU training story (start, stop, resume from an earlier checkpoint, finish) plus fast tests of the
failure record, restarts, deleting and comparing, driven through the engine's event hook.
"""
import math
import threading
import time
from pathlib import Path

import pytest

from studio.config.run import ConfigError
from studio.runs.folder import read_metrics
from studio.training.engine import Engine, Job
from studio.training.events import explain_error, memory_use
from studio.runs.folder import new_run
from studio.runs.history import History, HistoryError
from tests.conftest import tiny_run_config, wait_for


def _fake_job(cfg, job_id="job1", resume_from=None) -> Job:
    return Job(id=job_id, config=cfg, resume_from=resume_from)


def _emit(history: History, job: Job, type_: str, **data):
    history.record(job, {"type": type_, "time": time.time(), **data})


# ---- the real story -------------------------------------------------------------------------------------------------
def test_stop_then_resume_from_an_earlier_checkpoint_is_one_run_whose_curve_forks(tmp_path, tiny_model_dir):
    history = History()
    engine = Engine(on_event=history.record)
    # the history's story, not the model's: a tiny random model; no reference pass before training
    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 200,
                                       "train.save_steps": 2, "kto.precompute_ref_log_probs": False})
    job = engine.start(cfg)
    run = history.get(job.id)
    assert run["status"] == "starting" and run["name"] == "t"  # recorded before the thread does anything

    assert wait_for(lambda: any(m.get("step", 0) >= 3 for m in job.metrics()) or job.done)
    engine.stop()
    engine.wait(600)
    assert job.state == "stopped", job.error
    stopped_at = job.events[-1]["step"]
    run = history.get(job.id)
    assert run["status"] == "stopped" and run["ended_at"] >= run["created_at"]
    assert run["step"] == stopped_at and run["max_steps"] == 200
    assert Path(run["adapter_path"], "adapter_model.safetensors").is_file()
    assert {c["step"] for c in run["checkpoints"]} >= {2, stopped_at}
    assert [s for s, _ in history.checkpoints(job.id)][-1] == stopped_at
    assert [m["step"] for m in history.metrics(job.id)] == list(range(1, stopped_at + 1))
    assert math.isfinite(run["final_metrics"]["loss"])
    assert history.config(job.id) == cfg

    # resume from checkpoint-2, not the latest: steps after 2 are trained again and replace the old ones
    ckpt2 = str(Path(cfg.run_dir()) / "checkpoint-2")
    job2 = engine.start(cfg.updated({"train.max_steps": 4}), resume_from=ckpt2)
    assert history.run_for_job(job2.id) == job.id
    engine.wait(600)
    assert job2.state == "finished", job2.error
    assert [r["id"] for r in history.runs()] == [job.id]  # still one run
    run = history.get(job.id)
    assert run["status"] == "finished" and run["step"] == 4 and run["error"] is None
    assert [m["step"] for m in history.metrics(job.id)] == [1, 2, 3, 4]
    assert [m["step"] for m in read_metrics(cfg.run_dir()) if "loss" in m] == [1, 2, 3, 4]
    assert history.config(job.id).train.max_steps == 4
    attempts = history.attempts(job.id)
    assert [(a["status"], a["resume_from"]) for a in attempts] == [("stopped", None), ("finished", ckpt2)]
    assert Path(run["adapter_path"], "adapter_model.safetensors").is_file()


# ---- failures ------------------------------------------------------------------------------------------------------
def test_a_failed_run_stays_in_history_with_its_error_and_the_engine_takes_the_next(tmp_path):
    history = History()
    engine = Engine(on_event=history.record)
    job = engine.start(tiny_run_config(tmp_path, **{"data.train_file": str(tmp_path / "missing.jsonl")}))
    engine.wait(300)
    assert job.state == "failed"
    run = history.get(job.id)
    assert run["status"] == "failed"
    assert "missing.jsonl does not exist" in run["error"]
    assert run["ended_at"] is not None and run["adapter_path"] is None
    assert history.attempts(job.id)[0]["status"] == "failed"


def test_resuming_from_a_folder_that_is_not_a_checkpoint_is_refused_before_anything_starts(tmp_path):
    engine = Engine()
    with pytest.raises(ConfigError, match="not a saved checkpoint"):
        engine.start(tiny_run_config(tmp_path), resume_from=str(tmp_path))
    assert engine.job is None


@pytest.mark.parametrize("message", [
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })",
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: file write failed",
])
def test_a_full_disk_while_saving_says_to_free_space_and_resume(message):
    text = explain_error(RuntimeError(message))
    assert "disk filled up" in text and "resume" in text
    assert "disk is full" in explain_error(OSError(28, "No space left on device", "/runs/x/adapter"))


def test_memory_use_reports_the_card_beside_what_training_holds(monkeypatch):
    import torch

    class Props:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Props())
    mem = memory_use()
    assert (mem["gpu_mem_gib"], mem["gpu_reserved_gib"], mem["gpu_total_gib"]) == (3.0, 5.0, 8.0)
    assert mem["ram_gib"] > 0 and mem["ram_total_gib"] >= mem["ram_gib"]


# ---- restarts, deleting, comparing -----------------------------------------------------------------------------------
def test_after_a_restart_runs_of_a_dead_process_read_interrupted(tmp_path):
    from studio.runs import lock as runlock

    cfg = tiny_run_config(tmp_path)
    history = History()
    other = cfg.updated({"name": "other", "output_dir": str(tmp_path / "other")})
    dead, alive = _fake_job(cfg, "dead"), _fake_job(other, "alive")
    claim = runlock.claim(other.run_dir())  # the live one's trainer holds its run folder
    _emit(history, dead, "started")
    _emit(history, dead, "metrics", step=1, max_steps=3, loss=0.5)
    _emit(history, alive, "started")
    history.close()

    reopened = History()
    assert reopened.get("dead")["status"] == "interrupted"
    assert "Resume it" in reopened.get("dead")["error"]
    assert reopened.get("alive")["status"] == "starting"  # its trainer lives: left alone
    assert [m["step"] for m in reopened.metrics("dead")] == [1]
    runlock.release(claim)  # the trainer is gone: any reader of the history now says so
    assert [r["status"] for r in reopened.runs() if r["id"] == "alive"] == ["interrupted"]


def test_deleting_a_run_removes_only_the_studio_files_and_keeps_the_record(tmp_path):
    out = tmp_path / "my-folder"
    cfg = tiny_run_config(tmp_path, output_dir=str(out))
    for d in ("checkpoint-2", "checkpoint-4", "adapter"):
        (out / d).mkdir(parents=True)
        (out / d / "weights.bin").write_bytes(b"x")
    for f in ("metrics.jsonl", "run.yaml", "my-notes.txt"):
        (out / f).write_text("x")
    from studio.runs import lock as runlock

    history = History()
    job = _fake_job(cfg)
    claim = runlock.claim(out)
    _emit(history, job, "started")
    job.state = "running"
    _emit(history, job, "status", message="Training…")
    with pytest.raises(HistoryError, match="is training"):
        history.delete_files(job.id)
    runlock.release(claim)

    job.state = "stopped"
    _emit(history, job, "done", state="stopped", adapter=str(out / "adapter"), step=4)
    removed = history.delete_files(job.id)
    assert {Path(p).name for p in removed} == {"checkpoint-2", "checkpoint-4", "adapter", "metrics.jsonl", "run.yaml",
                                               ".run.lock"}
    assert sorted(p.name for p in out.iterdir()) == ["my-notes.txt"]  # the user's file stays
    run = history.get(job.id)
    assert run["files_deleted_at"] is not None and run["status"] == "stopped"
    assert history.checkpoints(job.id) == []


def test_deleting_the_last_files_removes_the_empty_run_folder(tmp_path):
    cfg = tiny_run_config(tmp_path)
    (cfg.run_dir() / "adapter").mkdir(parents=True)
    history = History()
    job = _fake_job(cfg)
    _emit(history, job, "started")
    job.state = "finished"
    _emit(history, job, "done", state="finished", adapter=str(cfg.run_dir() / "adapter"))
    history.delete_files(job.id)
    assert not cfg.run_dir().exists()


def test_events_from_the_training_thread_and_reads_from_ui_threads_do_not_collide(tmp_path):
    history = History()
    jobs = [_fake_job(tiny_run_config(tmp_path, name=f"r{i}", output_dir=str(tmp_path / f"r{i}")), f"j{i}")
            for i in range(4)]
    errors = []

    def train(job):
        try:
            for step in range(1, 51):
                _emit(history, job, "metrics", step=step, max_steps=50, loss=1 / step)
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    def browse():
        try:
            for _ in range(100):
                for r in history.runs():
                    history.metrics(r["id"])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=train, args=(j,)) for j in jobs] + [threading.Thread(target=browse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for job in jobs:
        assert [m["step"] for m in history.metrics(job.id)] == list(range(1, 51))
        assert history.get(job.id)["final_metrics"]["loss"] == pytest.approx(1 / 50)


def test_a_fresh_start_never_writes_into_an_existing_run(tmp_path, studio_home):
    from studio.config.run import RunConfig

    cfg = RunConfig().updated({"name": "demo"})
    assert new_run(cfg) == (cfg, None)
    (cfg.run_dir() / "checkpoint-2").mkdir(parents=True)
    fresh, note = new_run(cfg)
    assert fresh.name == "demo-2" and "demo" in note
    fresh.run_dir().mkdir()
    (fresh.run_dir() / "run.yaml").write_text("x")
    assert new_run(fresh)[0].name == "demo-3"  # -2 is taken too: no demo-2-2
    custom = cfg.updated({"output_dir": str(cfg.run_dir())})
    with pytest.raises(ValueError, match="already holds a run"):
        new_run(custom)


def test_final_metrics_keep_the_last_value_of_each_curve(tmp_path):
    history = History()
    job = _fake_job(tiny_run_config(tmp_path))
    _emit(history, job, "metrics", step=1, max_steps=2, loss=0.5, kl=0.1, **{"rewards/margins": 0.3})
    _emit(history, job, "metrics", step=2, max_steps=2, loss=0.4, kl=0.2)  # one-label batch: no margin
    final = history.get(job.id)["final_metrics"]
    assert (final["loss"], final["kl"], final["rewards/margins"]) == (0.4, 0.2, 0.3)


def test_two_runs_curves_can_be_compared_step_by_step(tmp_path):
    from studio.ui.train_tab import compare_frame

    history = History()
    a = _fake_job(tiny_run_config(tmp_path, name="a", output_dir=str(tmp_path / "a")), "ja")
    b = _fake_job(tiny_run_config(tmp_path, name="b", output_dir=str(tmp_path / "b")), "jb")
    for job, slope in ((a, 0.01), (b, 0.02)):
        _emit(history, job, "started")
        for step in (1, 2, 3):
            _emit(history, job, "metrics", step=step, max_steps=3, loss=0.5 - slope * step)
        _emit(history, job, "metrics", step=3, max_steps=3, eval_loss=0.4)  # eval entries are not the curve
    frame = compare_frame(history, "ja", "jb", "loss")
    assert sorted(set(frame.series)) == ["A: a (ja)", "B: b (jb)"]
    assert frame[frame.series == "B: b (jb)"].value.tolist() == pytest.approx([0.48, 0.46, 0.44])
    assert compare_frame(history, "ja", None, "loss").series.unique().tolist() == ["A: a (ja)"]


def test_a_torch_compiler_failure_says_it_is_unsloths_kernels_and_to_use_the_bnb_path():
    """Gemma-7B on Unsloth failed at its first step with torch Inductor's bare 'InductorError: AssertionError:' on the
    GPU (docs/GPU_RESULTS.md); the message must name the cause and the way around it."""
    from torch._inductor.exc import InductorError

    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(Path("/tmp/unused")).updated({"model.name_or_path": "google/gemma-7b-it"})
    try:
        try:
            raise AssertionError("")
        except AssertionError as inner:
            raise InductorError(inner, "") from inner
    except InductorError as e:
        text = explain_error(e, cfg)
    assert "Inductor" in text and "google/gemma-7b-it" in text and "model.backend: bnb" in text
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = InductorError(AssertionError(""), "")
    assert "model.backend: bnb" in explain_error(wrapped)
    assert "model.backend" not in explain_error(RuntimeError("something else"))
