"""Issue 29: several GPUs from the Train tab through `accelerate launch -m studio train` (studio/training/launcher.py);
on a CPU the same launcher runs `accelerate launch --cpu --num_processes 2`."""
from __future__ import annotations

import math

import pytest

from studio.runs import folder, live
from studio.training import launcher
from tests.conftest import tiny_run_config

WAIT = 2400


def test_the_train_tab_offers_all_gpus_only_when_several_are_visible():
    assert [n for _, n in launcher.gpu_choices(1)] == [1]
    assert launcher.gpu_choices(4)[-1] == ("all 4 GPUs (data-parallel)", 4)


def test_accelerate_launch_cpu_with_two_processes_trains_the_bundled_model_through_the_launcher(
        tmp_path, studio_home, bundled_model_dir):
    cfg = tiny_run_config(tmp_path, name="ddp", output_dir=None,
                          **{"train.max_steps": 2, "train.save_steps": 1000, "kto.precompute_ref_log_probs": False,
                             "kto.max_length": 64, "data.eval_fraction": 0.0})
    run = launcher.launch(cfg, 2, cpu=True)
    try:
        assert run.command[1:3] == ["-m", "accelerate.commands.launch"]
        assert run.command[run.command.index("--num_processes") + 1] == "2"
        assert run.command[-4:-1] == ["-m", "studio", "train"]
        rc = run.wait(WAIT)
    finally:
        if run.process.poll() is None:
            run.stop_processes()
    assert rc == 0, run.log.read_text()[-4000:]
    assert run.run_dir == studio_home / "runs" / "ddp"
    view = live.RunView(run.run_dir)  # rank 0 wrote the run folder's event log, as the Train tab reads it
    assert view.state == "finished", view.error
    assert [e["type"] for e in view.all_events].count("started") == 1  # one writer: rank 0
    assert [m["step"] for m in view.metrics() if "loss" in m] == [1, 2]
    assert folder.is_adapter_dir(run.run_dir / "adapter")
    # two ranks trained: a step took 2 rows on each, so the sample's rows are an epoch of n / 4 steps, not n / 2
    from studio.data import load_kto

    n = len(load_kto("sample").rows)
    last = [m for m in view.metrics() if "loss" in m][-1]
    assert last["epoch"] == pytest.approx(2 / math.ceil(n / 4), rel=0.01), last


def test_with_several_gpus_the_train_tab_offers_all_of_them_and_starts_through_the_launcher(tmp_path, monkeypatch):
    import gradio as gr

    from studio.config.run import RunConfig
    from studio.models import load as models
    from studio.models.load import DeviceInfo
    from studio.runs.history import History
    from studio.ui import train_tab as tt
    from studio.ui.app import Studio

    monkeypatch.setattr(models, "detect_device", lambda: DeviceInfo(kind="cuda", name="card", count=4,
                                                                    total_gib=80.0, free_gib=79.0))
    monkeypatch.setattr(tt, "duration_markdown", lambda cfg: "")
    studio = Studio(RunConfig().updated({"output_dir": None}), history=History(tmp_path / "h.sqlite"))
    with gr.Blocks() as app:
        tt.build(studio, app=app)
    [offered] = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "train-gpus"]
    assert [label for label, _ in offered.choices][-1] == "all 4 GPUs (data-parallel)" and offered.value == 4
    launched = []

    class Launched:
        def __init__(self, cfg, n):
            self.run_dir, self.log = cfg.run_dir(), tmp_path / "x.log"
            launched.append((cfg.name, n))

    monkeypatch.setattr(launcher, "launch", lambda cfg, n: Launched(cfg, n))
    values = tt.form_values(studio.config)
    out = tt.start_run(studio, "multi", [values[k] for k in tt.FORM_KEYS[1:]], 4)
    assert launched == [("multi", 4)] and "on 4 GPUs (data-parallel)" in out["message"]
    assert studio.engine.job is None  # not in this process: the run folder is how the tab follows it
