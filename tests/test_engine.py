"""The engine trains the bundled model for real on CPU, stops gracefully, resumes, and survives failures."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from studio.runs.folder import latest_checkpoint, read_metrics
from studio.training.engine import Engine, JobRunning
from tests.conftest import ROOT, tiny_run_config, wait_for


def _lora_b_norm(adapter_dir: Path) -> float:
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    bs = [t for k, t in tensors.items() if "lora_B" in k]
    assert bs, "adapter has no LoRA B matrices"
    return float(sum(t.float().norm() ** 2 for t in bs) ** 0.5)


def test_a_short_run_trains_the_adapter_and_logs_finite_metrics(tmp_path, bundled_model_dir):
    cfg = tiny_run_config(tmp_path)
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(600)
    assert job.state == "finished", job.error
    adapter = Path(job.adapter_path)
    assert (adapter / "adapter_config.json").is_file()
    # LoRA B starts at zero: a non-zero B means the optimizer really moved the adapter
    assert _lora_b_norm(adapter) > 0
    metrics = [m for m in job.metrics() if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "learning_rate"):
            if k in m:
                assert math.isfinite(m[k]), (k, m)
        assert math.isfinite(m["loss"])
    # what the UI and `python -m studio` read back from disk
    assert [m["step"] for m in read_metrics(cfg.run_dir()) if "loss" in m] == [1, 2, 3]
    assert (cfg.run_dir() / "run.yaml").is_file()
    assert job.backend == "full"
    # epochs 'auto' decided once for the sample's few rows (up to 3 passes; max_steps still stops it at 3 steps)
    plan = json.loads((cfg.run_dir() / "plan.json").read_text())
    assert cfg.train.num_train_epochs == "auto" and plan["epochs"] == job.plan.epochs == 3
    assert any(e.get("message", "").startswith("Epochs: 3 ('auto'") for e in job.events)


def test_stop_mid_run_saves_an_adapter_and_resume_continues_from_that_step(tmp_path, tiny_model_dir):
    # stopping and resuming, not what is learned: a tiny random model
    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 200,
                                       "train.save_steps": 1000})
    engine = Engine()
    job = engine.start(cfg)
    assert wait_for(lambda: any(m.get("step", 0) >= 1 for m in job.metrics()) or job.done)
    with pytest.raises(JobRunning):
        engine.start(cfg)
    engine.stop()
    engine.wait(300)
    assert job.state == "stopped", job.error
    stopped_at = job.events[-1]["step"]
    assert 1 <= stopped_at < 200
    assert (Path(job.adapter_path) / "adapter_model.safetensors").is_file()
    ckpt = latest_checkpoint(cfg.run_dir())[0]
    assert ckpt is not None and str(ckpt).endswith(f"checkpoint-{stopped_at}")
    # no second copy of the adapter (TRL's frozen reference) in what was saved (studio/training/speed.py)
    assert not (Path(job.adapter_path) / "ref").exists() and not (Path(ckpt) / "ref").exists()

    short = cfg.updated({"train.max_steps": stopped_at + 2})
    job2 = engine.start(short, resume_from="latest")
    engine.wait(600)
    assert job2.state == "finished", job2.error
    steps = [m["step"] for m in job2.metrics() if "loss" in m]
    assert steps == [stopped_at + 1, stopped_at + 2]


def test_a_failed_run_reports_a_fix_and_the_engine_stays_usable(tmp_path, tiny_model_dir):
    engine = Engine()
    bad = tiny_run_config(tmp_path, **{"data.train_file": str(tmp_path / "missing.jsonl")})
    job = engine.start(bad)
    engine.wait(120)
    assert job.state == "failed"
    assert "missing.jsonl does not exist" in job.error
    assert [e["type"] for e in job.events][-2:] == ["error", "done"]
    job2 = engine.start(tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 1,
                                                     "output_dir": str(tmp_path / "r2")}))
    engine.wait(600)
    assert job2.state == "finished", job2.error


def test_resume_without_checkpoint_is_refused(tmp_path):
    from studio.config.run import ConfigError

    with pytest.raises(ConfigError, match="no saved checkpoint"):
        Engine().start(tiny_run_config(tmp_path), resume_from="latest")


def test_cli_trains_the_quickstart_and_prints_where_the_adapter_went(tmp_path, bundled_model_dir):
    out = tmp_path / "cli-run"
    proc = subprocess.run(
        [sys.executable, "-m", "studio", "train", "presets/runs/quickstart.yaml", "--set", "train.max_steps=1",
         "--set", f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"adapter: {out / 'adapter'}" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1]


def test_cli_bad_config_exits_with_the_field_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  per_device_train_batch_size: 1\n")
    proc = subprocess.run([sys.executable, "-m", "studio", "train", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.per_device_train_batch_size" in proc.stderr


def test_a_run_that_learned_nothing_says_so_after_scoring_its_held_out_rows(tmp_path, bundled_model_dir):
    """The seed's full fine-tuning learning rate on a LoRA adapter: the run finishes, its held-out evaluation is
    stored with it, and the final message warns that nothing was learned and what to change."""
    # one step: at this rate the adapter barely moves in any number of steps; what is under test is the scoring after
    # training and the message it leads to
    cfg = tiny_run_config(tmp_path, **{"train.learning_rate": 5e-7, "data.eval_fraction": 0.25, "train.max_steps": 1,
                                       "data.eval_max_rows": 12})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(600)
    assert job.state == "finished", job.error
    evaluation = [e for e in job.events if e["type"] == "evaluation"]
    assert len(evaluation) == 1
    stored = json.loads((cfg.run_dir() / "eval.json").read_text())
    assert stored["n_rows"] == 12 and stored["rewards"] == evaluation[0]["rewards"]
    assert evaluation[0]["finding"] is not None
    done = job.events[-1]
    assert "shows no learning on held-out data" in done["message"] and "train.learning_rate" in done["message"]
