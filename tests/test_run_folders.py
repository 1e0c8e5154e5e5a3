"""Issue 18, points 4-5: a run folder has one writer, a used name never mixes two runs, checkpoints are whole or
absent, resume takes the newest readable checkpoint and says so, and a full disk is named as such."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from studio.runs import checkpoints, lock as runlock
from studio.config.run import ConfigError
from studio.runs.folder import latest_checkpoint, read_metrics
from studio.training.engine import Engine
from studio.training.events import explain_error
from tests.conftest import ROOT, tiny_run_config

HOLD = ("import sys, time; from studio.runs import lock as runlock; runlock.claim(sys.argv[1]); print('held', flush=True); "
        "time.sleep(60)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_held_by_a_live_process_is_refused_and_freed_by_the_kernel_when_it_is_killed(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        assert runlock.held(run)
        with pytest.raises(runlock.RunBusy, match=f"in use by process {proc.pid}"):
            runlock.claim(run)
        # the engine refuses before starting anything, as a ConfigError the CLI and the UI already report
        cfg = tiny_run_config(tmp_path, output_dir=str(run))
        with pytest.raises(ConfigError, match="in use by process"):
            Engine().start(cfg)
    finally:
        proc.kill()
        proc.wait()
    # kill -9: the kernel let go of the lock with the process; the file only says who trained here last
    assert not runlock.held(run)
    assert runlock.read(run)["pid"] == proc.pid
    claim = runlock.claim(run)
    assert runlock.held(run) and runlock.read(run)["pid"] == os.getpid()
    with pytest.raises(runlock.RunBusy):  # this process holds it: a second job here is refused too
        runlock.claim(run)
    runlock.release(claim)
    assert not runlock.held(run)


def test_a_lock_file_left_without_its_process_is_not_a_live_run(tmp_path):
    """A lock file whose pid lives (even this very process) holds nothing unless the kernel lock is taken."""
    run = tmp_path / "run"
    run.mkdir()
    info = {"pid": os.getpid(), "host": __import__("socket").gethostname(), "claimed": "2026-01-01T00:00:00"}
    (run / runlock.LOCK).write_text(json.dumps(info))
    assert not runlock.held(run)
    runlock.release(runlock.claim(run))


def _fake_used_run(run_dir):
    """What a finished 13-step run leaves (its adapter stands for the user's work)."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"13 steps of work")
    (run_dir / "checkpoint-13").mkdir()
    (run_dir / "run.yaml").write_text("name: mine\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n"
                                                   for s in range(1, 14)))


def test_cli_reusing_a_run_name_without_resume_trains_under_a_fresh_name(tmp_path, studio_home, tiny_model_dir):
    used = studio_home / "runs" / "mine"
    _fake_used_run(used)
    before = sorted(str(p.relative_to(used)) for p in used.rglob("*"))
    cfg = tiny_run_config(tmp_path, name="mine", output_dir=None,
                          **{**CHEAP, "model.name_or_path": str(tiny_model_dir), "train.max_steps": 1})
    yaml_path = tmp_path / "run.yaml"
    cfg.save(yaml_path)
    env = dict(os.environ, KTO_STUDIO_HOME=str(studio_home))
    proc = subprocess.run([sys.executable, "-m", "studio", "train", str(yaml_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run name 'mine' is used" in proc.stderr and "'mine-2'" in proc.stderr
    assert sorted(str(p.relative_to(used)) for p in used.rglob("*")) == before
    assert (used / "adapter" / "adapter_model.safetensors").read_bytes() == b"13 steps of work"
    assert [m["step"] for m in read_metrics(used)] == list(range(1, 14))
    fresh = studio_home / "runs" / "mine-2"
    assert [m["step"] for m in read_metrics(fresh) if "loss" in m] == [1]
    assert not runlock.held(fresh)  # released at the end


def test_cli_reusing_a_custom_output_folder_is_refused_with_the_choices(tmp_path, studio_home):
    used = tmp_path / "out"
    _fake_used_run(used)
    cfg = tiny_run_config(tmp_path, output_dir=str(used))
    yaml_path = tmp_path / "run.yaml"
    cfg.save(yaml_path)
    env = dict(os.environ, KTO_STUDIO_HOME=str(studio_home))
    proc = subprocess.run([sys.executable, "-m", "studio", "train", str(yaml_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr and "output_dir" in proc.stderr
    assert (used / "adapter" / "adapter_model.safetensors").read_bytes() == b"13 steps of work"


# ---- checkpoints -------------------------------------------------------------------------------------------------

# checkpoints, not learning: the tiny random model (tests/conftest.py tiny_model_dir) with the tests' own model path
CHEAP = {"train.max_steps": 2, "train.save_steps": 1, "kto.precompute_ref_log_probs": False, "kto.max_length": 64}
WAIT = 2400  # a shared, busy 2-core CPU can take minutes per step


@pytest.fixture(scope="module")
def trained_two(tmp_path_factory, tiny_model_dir):
    """A 2-step run saving checkpoint-1 and checkpoint-2 through the engine's atomic saves (trained once)."""
    root = tmp_path_factory.mktemp("two")
    cfg = tiny_run_config(root, **CHEAP, **{"model.name_or_path": str(tiny_model_dir)})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(WAIT)
    assert job.state == "finished", job.error
    names = sorted(p.name for p in cfg.run_dir().iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" in names
    assert not [n for n in names if n.startswith(checkpoints.STAGING_PREFIX)] and not runlock.held(cfg.run_dir())
    return cfg.run_dir()


@pytest.fixture()
def two_checkpoints(trained_two, tmp_path):
    """A copy of that run that a test may damage."""
    copy = tmp_path / "copy"
    shutil.copytree(trained_two, copy)
    return copy


@pytest.mark.parametrize("damage", ["no_state", "cut_weights", "cut_optimizer", "bad_state"])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_which_it_took(two_checkpoints, tmp_path, damage,
                                                                         tiny_model_dir):
    newest = two_checkpoints / "checkpoint-2"
    if damage == "no_state":
        (newest / "trainer_state.json").unlink()
    elif damage == "bad_state":
        (newest / "trainer_state.json").write_text('{"global_st')
    else:
        f = newest / ("adapter_model.safetensors" if damage == "cut_weights" else "optimizer.pt")
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    assert checkpoints.problem(newest) is not None
    assert checkpoints.problem(two_checkpoints / "checkpoint-1") is None
    assert latest_checkpoint(two_checkpoints)[0] == two_checkpoints / "checkpoint-1"
    # naming the damaged checkpoint says what is wrong with it and which earlier one to take
    cfg = tiny_run_config(tmp_path, output_dir=str(two_checkpoints), **CHEAP,
                          **{"model.name_or_path": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match=r"checkpoint-2 cannot be resumed: .*checkpoint-1"):
        Engine().start(cfg, resume_from=str(newest))


def test_resume_latest_reports_the_skipped_checkpoint_and_finishes(two_checkpoints, tmp_path, tiny_model_dir):
    (two_checkpoints / "checkpoint-2" / "trainer_state.json").unlink()
    shutil.rmtree(two_checkpoints / "adapter")
    cfg = tiny_run_config(tmp_path, output_dir=str(two_checkpoints), **CHEAP,
                          **{"model.name_or_path": str(tiny_model_dir)})
    engine = Engine()
    job = engine.start(cfg, resume_from="latest")
    engine.wait(WAIT)
    assert job.state == "finished", job.error
    notes = [e["message"] for e in job.events if e["type"] == "status"]
    assert any("Resuming from checkpoint-1" in n and "checkpoint-2 skipped: trainer_state.json is missing" in n
               for n in notes), notes
    assert checkpoints.problem(two_checkpoints / "checkpoint-2") is None  # saved again, whole this time


def test_a_full_disk_while_saving_is_named_leaves_no_partial_checkpoint_and_resume_works(tmp_path, monkeypatch,
                                                                                           tiny_model_dir):
    """torch.save on a full disk: part of optimizer.pt is written, then PyTorch's zip writer fails with
    'unexpected pos' (what a real full disk gave). Here the disk 'fills' at the step-2 checkpoint."""
    import torch

    real_save = torch.save

    def full_disk_save(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)) and "checkpoint-2" in str(f) and str(f).endswith("optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4672")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk_save)
    cfg = tiny_run_config(tmp_path, **CHEAP, **{"model.name_or_path": str(tiny_model_dir)})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(WAIT)
    assert job.state == "failed"
    assert job.error.startswith("The disk is full"), job.error
    assert str(cfg.run_dir()) in job.error and "free" in job.error and "a checkpoint needs about" in job.error
    assert "resume" in job.error
    names = sorted(p.name for p in cfg.run_dir().iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" not in names
    assert not [n for n in names if n.startswith(checkpoints.STAGING_PREFIX)], names

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    job = engine.start(cfg, resume_from="latest")
    engine.wait(WAIT)
    assert job.state == "finished", job.error
    assert job.resume_from == str(cfg.run_dir() / "checkpoint-1")
    assert [m["step"] for m in read_metrics(cfg.run_dir()) if "loss" in m] == [1, 2]


def test_disk_full_messages_name_the_folder():
    class Cfg:
        def run_dir(self):
            from pathlib import Path

            return Path("/tmp")

    text = explain_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123"), Cfg())
    assert text.startswith("The disk is full: saving into /tmp failed") and "free" in text
