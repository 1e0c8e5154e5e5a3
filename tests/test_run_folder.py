"""studio.runs.folder owns a run's files and the new-run / resume rules: files from older versions (eval.json with
other keys, a cut-off metrics line or eval file, a run.yaml with a removed key) are read, and the CLI and the UI go
through the same functions, so `studio train` twice never mixes two runs and `--resume` never takes a checkpoint an
older run left in the folder.

Training is faked here (a trainer that logs steps and saves whole checkpoints); the real engine runs around it."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from studio import cli
from studio.config.run import ConfigError
from studio.runs import folder
from studio.training.engine import Engine
from studio.tuned import evaluate
from tests.conftest import tiny_run_config
from tests.test_eval_file import OLD_ENGINE_FILE

# ---- files from older versions -----------------------------------------------------------------------------------


def test_an_eval_file_of_an_older_version_is_read_with_every_key(tmp_path):
    (tmp_path / folder.EVAL_FILE).write_text(json.dumps(OLD_ENGINE_FILE), encoding="utf-8")
    scored = evaluate.read_eval(tmp_path)  # the one reader of eval.json: defaults and the derived keys
    assert scored["adapter_label"] == "old · final adapter" and scored["run_dir"] == str(tmp_path)
    assert scored["created"] and scored["data"]
    assert scored["verdict"]["word"] == evaluate.NO_CHANGE and scored["drift"] == pytest.approx(-0.05)
    assert scored["rewards"]["pair_accuracy_se"] is not None


@pytest.mark.parametrize("cut", [1, 40, 150])
def test_a_cut_off_eval_file_is_no_evaluation(tmp_path, cut):
    (tmp_path / folder.EVAL_FILE).write_text(json.dumps(OLD_ENGINE_FILE, indent=2)[:cut], encoding="utf-8")
    assert evaluate.read_eval(tmp_path) is None


def test_the_eval_writer_is_atomic_and_its_file_reads_back(tmp_path):
    evaluate.write_eval(tmp_path, {"run": "x", "n_pairs": "3"})
    assert not list(tmp_path.glob("*.part"))
    back = evaluate.read_eval(tmp_path)
    assert back["run"] == "x" and back["n_pairs"] == 0 and back["created"]


def test_a_cut_off_last_metrics_line_is_skipped_and_the_next_entry_is_kept(tmp_path):
    folder.append_metrics(tmp_path, {"step": 1, "loss": 0.7})
    with open(tmp_path / folder.METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')  # the process died mid-write
    assert folder.read_metrics(tmp_path) == [{"step": 1, "loss": 0.7}]
    folder.append_metrics(tmp_path, {"step": 2, "loss": 0.6})  # the resumed run logs step 2 again
    assert [m["step"] for m in folder.read_metrics(tmp_path)] == [1, 2]
    (tmp_path / folder.METRICS_FILE).write_bytes(b'{"step": 1}\n\xff\xfe garbage\n[1, 2]\n{"step": 3}\n')
    assert [m["step"] for m in folder.read_metrics(tmp_path)] == [1, 3]
    assert folder.read_metrics(tmp_path / "nowhere") == []


def test_forgetting_metrics_after_a_checkpoint_keeps_the_earlier_steps(tmp_path):
    for s in (1, 2, 3, 4):
        folder.append_metrics(tmp_path, {"step": s})
    folder.forget_metrics_after(tmp_path, 2)
    assert [m["step"] for m in folder.read_metrics(tmp_path)] == [1, 2]


def test_a_run_yaml_with_a_removed_key_still_loads(tmp_path):
    cfg = tiny_run_config(tmp_path, name="old")
    data = yaml.safe_load(cfg.to_yaml())
    data["train"]["a_field_since_removed"] = 3
    data["memory"]["precompute_ref"] = True
    data["gone_section"] = {"x": 1}
    (tmp_path / folder.CONFIG_FILE).write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = folder.read_config(tmp_path)
    assert loaded.name == "old" and loaded.train.learning_rate == cfg.train.learning_rate
    # a wrong value is still an error that names the field, and a folder without run.yaml is not a run
    data["train"]["learning_rate"] = "fast"
    (tmp_path / folder.CONFIG_FILE).write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="learning_rate"):
        folder.read_config(tmp_path)
    with pytest.raises(ConfigError, match="not a run folder"):
        folder.read_config(tmp_path / "empty")


def test_plan_and_error_files_round_trip(tmp_path):
    assert folder.read_plan(tmp_path) is None and folder.read_error(tmp_path) is None
    folder.write_plan(tmp_path, {"device": "cpu", "micro_batch": 2})
    assert folder.read_plan(tmp_path) == {"device": "cpu", "micro_batch": 2}
    (tmp_path / folder.PLAN_FILE).write_text('{"device": "c')
    assert folder.read_plan(tmp_path) is None
    folder.write_error(tmp_path, "Traceback ...")
    assert folder.read_error(tmp_path) == "Traceback ..."


# ---- a fake trainer inside the real engine ---------------------------------------------------------------------------

def _whole_checkpoint(path: Path, step: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")


class FakeTrainer:
    """Logs one metrics entry per step and saves a whole checkpoint after each, as the engine's trainer does."""

    def __init__(self, engine, job, crash_at=None):
        self.engine, self.job, self.crash_at = engine, job, crash_at
        self.state = SimpleNamespace(global_step=0)

    def train(self, resume_from_checkpoint=None):
        self.job.resumed_from = resume_from_checkpoint
        start = folder.step_of(resume_from_checkpoint) if resume_from_checkpoint else 0
        for step in range(start + 1, self.job.config.train.max_steps + 1):
            if step == self.crash_at:
                raise RuntimeError("the machine went away")
            self.state.global_step = step
            self.engine.emit(self.job, "metrics", step=step, loss=1.0 / step)
            tmp = self.job.run_dir / f".saving-{step}"
            _whole_checkpoint(tmp, step)
            folder.mark_checkpoint(self.job.run_dir, tmp)  # as checkpoints.atomic_saves does before publishing
            tmp.rename(folder.checkpoint_dir(self.job.run_dir, step))

    def save_model(self, path):
        _whole_checkpoint(Path(path), self.state.global_step)


@pytest.fixture()
def fake_training(monkeypatch):
    crash = {"at": None}
    monkeypatch.setattr(Engine, "_build", lambda self, job: FakeTrainer(self, job, crash["at"]))
    return crash


@pytest.fixture()
def rule_calls(monkeypatch):
    """Which rule functions were called (the CLI and the UI must call these, not rules of their own)."""
    calls = []
    for name in ("new_run", "resume_run", "resume_point"):
        real = getattr(folder, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(folder, name, spy)
    return calls


def _steps(run_dir):
    return [m["step"] for m in folder.read_metrics(run_dir) if "loss" in m]


# ---- the CLI -------------------------------------------------------------------------------------------------------

def test_studio_train_twice_on_one_config_makes_a_second_run(tmp_path, studio_home, fake_training, rule_calls,
                                                               capsys):
    cfg = tiny_run_config(tmp_path, name="twice", output_dir=None, **{"train.max_steps": 2})
    yaml_path = cfg.save(tmp_path / "twice.yaml")
    assert cli.main(["train", str(yaml_path)]) == 0
    assert cli.main(["train", str(yaml_path)]) == 0
    first, second = studio_home / "runs" / "twice", studio_home / "runs" / "twice-2"
    assert _steps(first) == [1, 2] and _steps(second) == [1, 2]  # nothing appended to the first run's log
    assert folder.read_config(second).name == "twice-2"
    assert folder.run_id(first) != folder.run_id(second)
    assert "'twice-2'" in capsys.readouterr().err
    assert rule_calls.count("new_run") == 2


def test_resume_on_a_fresh_folder_does_not_take_an_older_runs_checkpoints(tmp_path, studio_home, fake_training,
                                                                           rule_calls, capsys):
    out = tmp_path / "out"
    cfg = tiny_run_config(tmp_path, name="same", output_dir=str(out), **{"train.max_steps": 3})
    yaml_path = cfg.save(tmp_path / "same.yaml")
    assert cli.main(["train", str(yaml_path)]) == 0
    assert folder.run_checkpoints(out)[-1][0] == 3
    # a new run of the same name starts afresh in that folder (an older studio did this) and dies before saving
    fake_training["at"] = 1
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(60)
    assert job.state == "failed" and "went away" in folder.read_error(out)
    fake_training["at"] = None
    # the folder's checkpoints are the older run's: neither the CLI nor the engine resume from them
    assert folder.run_checkpoints(out) == [] and folder.latest_checkpoint(out) == (None, [])
    assert cli.main(["train", str(yaml_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no saved checkpoint" in err and "checkpoint-3" in err and "older run" in err
    with pytest.raises(ConfigError, match="older run"):
        Engine().start(cfg, resume_from=str(out / "checkpoint-3"))
    assert "resume_run" in rule_calls and "resume_point" in rule_calls


def test_cli_resume_continues_this_runs_checkpoints_and_keeps_the_adapter_shape(tmp_path, studio_home,
                                                                                 fake_training, capsys):
    out = tmp_path / "out"
    cfg = tiny_run_config(tmp_path, output_dir=str(out), **{"train.max_steps": 2})
    yaml_path = cfg.save(tmp_path / "r.yaml")
    assert cli.main(["train", str(yaml_path)]) == 0
    longer = cfg.updated({"train.max_steps": 4, "lora.r": cfg.lora.r * 2})
    longer.save(yaml_path)
    assert cli.main(["train", str(yaml_path), "--resume"]) == 0
    assert _steps(out) == [1, 2, 3, 4]
    saved = folder.read_config(out)
    assert saved.train.max_steps == 4 and saved.lora.r == cfg.lora.r  # a resume cannot change the adapter's shape
    assert f"r={cfg.lora.r}" in capsys.readouterr().err


def test_an_old_folder_without_a_run_id_still_resumes_its_checkpoints(tmp_path):
    _whole_checkpoint(tmp_path / "checkpoint-4", 4)  # written before checkpoints carried their run's id
    assert folder.run_id(tmp_path) is None
    assert folder.resume_point(tmp_path, "latest") == (str(tmp_path / "checkpoint-4"), "Resuming from checkpoint-4")
    folder.start_fresh(tmp_path)  # a new run takes the folder
    with pytest.raises(ConfigError, match="older run"):
        folder.resume_point(tmp_path, "latest")


# ---- the UI uses the same rules ------------------------------------------------------------------------------------

def test_the_train_tab_starts_and_resumes_through_the_same_rules(tmp_path, studio_home, fake_training, rule_calls):
    from studio.ui import train_tab
    from studio.ui.app import Studio

    cfg = tiny_run_config(tmp_path, name="ui", output_dir=None, **{"train.max_steps": 2})
    studio = Studio(config=cfg)
    values = [getattr(getattr(cfg, s), n) for s, n in train_tab.FIELDS]

    # the Start and Resume buttons' handlers (studio/ui/train_tab.py), called as the page calls them
    train_tab.start_run(studio, "ui", values)
    studio.engine.wait(60)
    out = train_tab.start_run(studio, "ui", values)
    message, name = out["message"], out.get("name")
    studio.engine.wait(60)
    assert name == "ui-2" and "`ui-2`" in message
    assert _steps(studio_home / "runs" / "ui") == [1, 2] and _steps(studio_home / "runs" / "ui-2") == [1, 2]

    more = list(values)
    more[[n for _, n in train_tab.FIELDS].index("max_steps")] = 3
    message = train_tab.resume_run(studio, "ui", train_tab.LATEST, more)["message"]
    studio.engine.wait(60)
    assert "checkpoint-2" in message, message
    assert _steps(studio_home / "runs" / "ui") == [1, 2, 3]
    assert rule_calls.count("new_run") == 2 and "resume_run" in rule_calls and "resume_point" in rule_calls
