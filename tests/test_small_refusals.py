"""Issue 28, the smaller items: each bad input gets a clear message instead of a silent guess or a misleading one."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studio.config.run import ConfigError, RunConfig, parse_sets
from studio.data import SAMPLE_PATH, load_kto
from studio.data.normalize import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,text", [
    ("dup.jsonl", '{"prompt": "a", "completion": "b", "label": true, "label": false}\n'),
    ("dup.json", '[{"prompt": "a", "completion": "b", "label": true, "label": false}]'),
])
def test_a_duplicate_json_key_is_an_error_not_the_last_value(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match="'label' appears more than once"):
        load_kto(str(f))


@pytest.mark.parametrize("item", ["train.max_steps=true", "kto.beta=true", "train.learning_rate=false",
                                  "lora.r=true"])
def test_a_yes_no_value_for_a_number_is_refused(item):
    with pytest.raises(ConfigError, match=f"{item.split('=')[0]}: is (true|false), a yes/no value.*takes a number"):
        RunConfig().updated(parse_sets([item]))
    cfg = RunConfig().updated(parse_sets(["train.gradient_checkpointing=false", "train.max_steps=7"]))
    assert cfg.train.gradient_checkpointing is False and cfg.train.max_steps == 7


def test_a_full_disk_before_the_first_checkpoint_does_not_promise_a_resume(tmp_path):
    from studio.runs import checkpoints
    from studio.training.events import explain_error

    run = tmp_path / "run"
    run.mkdir()
    text = str(checkpoints.disk_full(run, None))
    assert "start the run again" in text and "nothing to resume" in text and "continues from" not in text

    class Cfg:
        def run_dir(self):
            return run

    text = explain_error(OSError(28, "No space left on device"), Cfg())
    assert text.startswith("The disk is full") and "continues from" not in text


def test_data_with_a_remote_code_tokenizer_keeps_stdout_json_and_says_why(tmp_path, bundled_model_dir):
    """transformers asks "[y/N]" on stdout when a tokenizer needs its repository's code; `studio data` prints JSON
    there. The tokenizer is loaded with trust_remote_code=False: no question, no custom code run, a clear note."""
    model = tmp_path / "remote-code"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(Path(bundled_model_dir) / name, model / name)
    tc = json.loads((Path(bundled_model_dir) / "tokenizer_config.json").read_text())
    tc.update(auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
              tokenizer_class="CustomTokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    (model / "tokenization_custom.py").write_text("raise SystemExit('custom code ran')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "studio", "data", str(SAMPLE_PATH), "--model", str(model),
                        "--out", str(tmp_path / "o.jsonl")], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "[y/N]" not in p.stdout + p.stderr
    summary = json.loads(p.stdout)
    assert "needs custom code from its repository (trust_remote_code)" in json.dumps(summary)


def test_an_output_folder_that_cannot_be_written_is_named_as_the_output_problem(tmp_path, monkeypatch):
    import tempfile

    from studio.cli import main

    def refused(*a, **kw):
        raise PermissionError(13, "Permission denied", kw.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)  # a read-only folder (root would bypass chmod)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["data", str(SAMPLE_PATH), "--out", str(tmp_path / "ro" / "o.jsonl")])
    text = err.getvalue()
    assert code == 1 and "cannot write the output" in text and "Permission denied" in text
    assert "could not be processed" not in text and "the input was read fine" in text
