"""Issue 18, points 7 and 9: loading is linear in the rows and reports progress; data is never changed silently and
failures say what was wrong in one message."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from studio.data import load_kto
from studio.data.normalize import DataError, normalize
from tests.conftest import ROOT


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- point 7 -----------------------------------------------------------------------------------------------------

def test_unifying_formats_checks_the_rows_once_not_once_per_row(monkeypatch):
    """The loop over rows called any() over all rows for each row (38,209 calls on a 20 MB slice): count them."""
    import builtins

    from studio.data import normalize as norm_mod

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}", "label": i % 2 == 0}
            for i in range(2000)]
    calls = {"n": 0}
    real_any = builtins.any

    def counting_any(it):
        calls["n"] += 1
        return real_any(it)

    monkeypatch.setattr(norm_mod, "any", counting_any, raising=False)
    out = normalize(rows, strict=False)
    assert len(out.rows) == 2000 and all(isinstance(r["completion"], list) for r in out.rows)
    assert calls["n"] < 20, calls


def test_loading_reports_progress_from_reading_to_converting(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(500)])
    seen = []
    load_kto(str(f), strict=False, progress=lambda frac, msg: seen.append((frac, msg)))
    fractions = [s[0] for s in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] >= 0.9
    assert any(m.startswith("reading line") for _, m in seen) and any("KTO rows" in m for _, m in seen)


def test_cli_data_shows_a_progress_bar_when_loading_takes_a_while(tmp_path):
    """A file slow enough to take more than 2 s here gets a bar on stderr (tqdm's delay keeps quick loads quiet)."""
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i} " * 30, "chosen": "good " * 40, "rejected": "bad " * 40}
                                      for i in range(60_000)])
    proc = subprocess.run([sys.executable, "-m", "studio", "data", str(f), "--out", str(tmp_path / "o.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%|" in proc.stderr, proc.stderr[-2000:]


# ---- point 9 -----------------------------------------------------------------------------------------------------

def test_dict_and_array_cells_are_refused_not_turned_into_text(tmp_path):
    import pandas as pd

    f = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": [{"a": 1, "b": [1, 2]}, {"a": 2, "b": [3]}], "completion": ["x", "y"],
                  "label": [True, False]}).to_parquet(f)
    with pytest.raises(DataError, match=r"row 1: the prompt is a dict .*not text"):
        load_kto(str(f), strict=False)


def test_a_repeated_csv_column_is_refused_not_dropped(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,completion,prompt,label\nq1,a1,other1,true\nq2,a2,other2,false\n")
    with pytest.raises(DataError, match=r"'prompt' appears twice in the header \(columns 1 and 3\)"):
        load_kto(str(f), strict=False)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused_with_the_line(tmp_path, constant):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "q", "completion": "a", "label": true}\n'
                 f'{{"prompt": {constant}, "completion": "a", "label": false}}\n')
    with pytest.raises(DataError, match=rf"line 2: {constant} is not a JSON value"):
        load_kto(str(f), strict=False)
    g = tmp_path / "d.json"
    g.write_text(f'[{{"prompt": "q", "completion": {constant}, "label": true}}]')
    with pytest.raises(DataError, match=rf"{constant} is not a JSON value"):
        load_kto(str(g), strict=False)


def test_deeply_nested_json_says_so_instead_of_recursion_error(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_kto(str(f), strict=False)


@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_utf16_without_a_byte_order_mark_is_read(tmp_path, encoding):
    f = tmp_path / "d.jsonl"
    text = '{"prompt": "Grüß dich", "completion": "Hallo", "label": true}\n' \
           '{"prompt": "q", "completion": "nein", "label": false}\n'
    f.write_bytes(text.encode(encoding))
    out = load_kto(str(f), strict=False)
    assert out.rows[0]["prompt"] == "Grüß dich" and len(out.rows) == 2


def test_a_bad_set_value_is_one_clear_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "studio", "train", "presets/runs/quickstart.yaml", "--set",
                           "train.max_steps=[1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--set train.max_steps=[1: '[1' is not a value" in proc.stderr


def test_a_failed_run_prints_its_message_once_without_a_traceback(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: broken\noutput_dir: {tmp_path / 'out'}\ndata:\n  train_file: {tmp_path / 'missing.jsonl'}\n")
    proc = subprocess.run([sys.executable, "-m", "studio", "train", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("missing.jsonl does not exist") == 1, proc.stderr
    assert "Traceback" in (tmp_path / "out" / "error.log").read_text()


def test_a_bogus_config_json_is_named(tmp_path):
    from studio.models import load as models

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match=rf"{folder / 'config.json'} is not a readable model config"):
        models.resolve_source(str(folder))
    (folder / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(models.ModelLoadError, match=r"config.json is not a model config \(no model_type\)"):
        models.resolve_source(str(folder))


def test_a_model_that_needs_remote_code_names_the_setting(tmp_path):
    from studio.models import load as models
    from studio.config.run import RunConfig

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mycustom", "architectures": ["MyCustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mycustom.MyCustomConfig",
                     "AutoModelForCausalLM": "modeling_mycustom.MyCustomForCausalLM"}}))
    cfg = RunConfig().updated({"model.name_or_path": str(folder)})
    with pytest.raises(models.ModelLoadError, match=r"needs code from its own repository.*model\.trust_remote_code"):
        models.load_for_training(cfg)
