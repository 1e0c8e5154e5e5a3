"""What the studio prints on a terminal (issue 30, item 12): no raw TRL log dicts between the progress bars, and
the start text names the studio's own --share flag, not Gradio's `share=True` in `launch()`."""
from __future__ import annotations

from tests.conftest import tiny_run_config, wait_for


def test_a_run_prints_no_raw_trl_log_dicts(tmp_path, tiny_model_dir, capfd):
    from studio.training.engine import Engine

    engine = Engine()
    job = engine.start(tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 2,
                                                    "train.logging_steps": 1}))
    engine.wait()
    assert job.state != "failed", job.error
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "'grad_norm'" not in out + err


def test_the_start_text_names_the_studios_share_flag(tmp_path):
    from tests.browser.conftest import serve_studio

    log = tmp_path / "app.log"
    with serve_studio(tmp_path / "home", log):
        assert wait_for(lambda: "KTO Studio is running on" in log.read_text(), timeout=60), log.read_text()
    text = log.read_text()
    assert "--share" in text and "share=True" not in text and "launch()" not in text
