"""Every command fails the same way: one 'error: …' line on stderr, no traceback, and the exit code of the error's
kind (studio/errors.py): 2 when what was asked cannot be done as asked, 1 when it was tried and failed."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import studio
from studio.cli import main
from studio.errors import StudioError, UsageError


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, code, words", [
    (["data", "{tmp}/missing.jsonl", "--out", "{tmp}/o.jsonl"], 1, "does not exist"),
    (["data", "{tmp}/in.jsonl", "--out", "{tmp}/o.jsonl", "--map", "nonsense"], 2, "--map needs THEIRS=OURS"),
    (["fit", "--model", "{tmp}/nothing.gguf", "--gpu-gib", "7.5"], 2, "does not exist"),
    (["eval", "{tmp}"], 2, "not a run folder"),
    (["export", "{tmp}", "--format", "adapter", "--out", "{tmp}/out"], 2, "{tmp}"),
    (["train", "{tmp}/bad.yaml"], 2, "train.per_device_train_batch_size"),
    (["train", "presets/runs/quickstart.yaml", "--set", "nonsense"], 2, "--set needs FIELD=VALUE"),
])
def test_each_command_fails_with_one_line_and_the_exit_code_of_its_kind(capsys, tmp_path, monkeypatch, argv, code,
                                                                         words):
    monkeypatch.setenv("KTO_STUDIO_HOME", str(tmp_path / "home"))
    (tmp_path / "in.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    (tmp_path / "bad.yaml").write_text("train:\n  per_device_train_batch_size: 1\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, out, err = _run(capsys, argv)
    assert got == code, err
    assert words.replace("{tmp}", str(tmp_path)) in _one_error_line(err)
    assert out == ""


def test_an_unexpected_error_is_one_line_with_the_way_to_see_more(capsys, monkeypatch, tmp_path):
    from studio.runs import history

    monkeypatch.setenv("KTO_STUDIO_HOME", str(tmp_path))
    monkeypatch.delenv("STUDIO_DEBUG", raising=False)

    def boom(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(history.History, "votes", boom)
    code, _, err = _run(capsys, ["votes"])
    assert code == 1
    line = _one_error_line(err)
    assert "RuntimeError: disk on fire" in line and "STUDIO_DEBUG=1" in line
    monkeypatch.setenv("STUDIO_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["votes"])


def _studio_modules():
    for m in pkgutil.walk_packages(studio.__path__, "studio."):
        if not m.name.startswith("studio.ui") and m.name != "studio.__main__":
            yield m.name


def test_every_error_the_core_raises_derives_from_the_one_base_class():
    """A user-facing error class anywhere in the core carries an exit code (UI modules need gradio: not scanned)."""
    found = {}
    for name in _studio_modules():
        mod = importlib.import_module(name)
        for cls_name, cls in vars(mod).items():
            if (inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == name
                    and cls_name.endswith(("Error", "Refused", "Running", "WontFit"))):
                found[f"{name}.{cls_name}"] = cls
    assert len(found) >= 10, found
    strays = [n for n, c in found.items() if not issubclass(c, StudioError)]
    assert not strays, f"error classes outside the StudioError family: {strays}"
    assert {c.exit_code for c in found.values()} == {1, 2}
    assert issubclass(found["studio.config.run.ConfigError"], UsageError)
