"""Every path box of the web UI is bounded by construction (issue 28, case 1).

The test walks the whole app's API: every event whose inputs include a text box is called, as Gradio calls it, with
each text box (except the few listed in NOT_PATHS, which are not paths) set to a path outside the studio's folders,
given four ways: absolute, ``~``, ``../`` and a symlink inside the studio home that points out. Each must be refused
(the answer says the web UI does not read/write there), and nothing outside may be opened, listed or written (an
audit hook watches the process). A new text box wired to a path without safepaths fails here.
"""
from __future__ import annotations

import inspect
import os
import sys

import gradio as gr
import pytest

from studio import safepaths

# text boxes that are not paths (say why); every other text box of the app is attacked as a path
NOT_PATHS = {
    "data-flip-rows": "row numbers",
    "hf-token": "a secret passed to huggingface_hub's login",
    "run-name": "a folder name, checked by RunConfig (letters, digits, '-', '_', '.')",
    "cfg-train-num_train_epochs": "a number or 'auto'",
    "cfg-memory-micro_batch_size": "a number or 'auto'",
    "chat-input": "a chat message",
    "chat-system": "a system prompt",
    "ab-input": "a chat message",
    "ab-system": "a system prompt",
}
SECRET = "AWS_SECRET_ACCESS_KEY=do-not-show"
_watch: dict = {"outside": None, "hits": [], "busy": False}
_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree",
           "shutil.copyfile", "os.symlink", "os.chmod", "os.truncate", "os.utime"}


def _hook(event, args):
    outside = _watch["outside"]
    if outside is None or event not in _EVENTS or _watch["busy"] or not args:
        return
    _watch["busy"] = True
    try:
        a = args[0]
        if isinstance(a, (str, bytes, os.PathLike)):
            p = os.fsdecode(a)
            if p.startswith(outside) or os.path.realpath(p).startswith(outside):
                _watch["hits"].append((event, p))
    except Exception:  # noqa: BLE001 - never break the code under test
        pass
    finally:
        _watch["busy"] = False


sys.addaudithook(_hook)


def _texts(value) -> str:
    """Every string in a handler's answer (dicts of updates, tuples, nested)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(_texts(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return " ".join(_texts(v) for v in value)
    return ""


def _call(fn, args) -> str:
    try:
        out = fn(*args)
        if inspect.isgenerator(out):
            return " ".join(_texts(o) for o in out)
        return _texts(out)
    except gr.Error as e:
        return str(e.message)
    except Exception as e:  # noqa: BLE001 - a crash is an answer too (checked below like any other)
        return f"{type(e).__name__}: {e}"


@pytest.fixture
def attack(tmp_path, studio_home, monkeypatch):
    outside = (tmp_path / "outside").resolve()
    (outside / "model").mkdir(parents=True)
    (outside / "creds.csv").write_text(f"prompt,completion,label\n{SECRET},x,true\n")
    (outside / "model" / "config.json").write_text("{}")
    cwd = studio_home / "exports"
    cwd.mkdir(parents=True)
    (cwd / "esc").symlink_to(outside)  # a link inside the studio home pointing out
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(outside))
    values = [str(outside / "creds.csv"), "~/creds.csv", "../../outside/creds.csv", "esc/creds.csv",
              str(outside / "model"), "esc/model"]
    return str(outside), values


def test_every_path_box_of_the_app_refuses_paths_outside_the_studio(attack):
    from studio.ui.app import Studio, build_app

    outside, values = attack
    app = build_app(Studio())
    boxes = set()
    checked = 0
    for block_fn in app.fns.values():
        texts = [c for c in block_fn.inputs if isinstance(c, gr.Textbox) and c.elem_id not in NOT_PATHS]
        for box in texts:
            boxes.add(box.elem_id)
            for value in values:
                args = [value if c is box else getattr(c, "value", None) for c in block_fn.inputs]
                _watch.update(outside=outside, hits=[])
                try:
                    answer = _call(block_fn.fn, args)
                finally:
                    _watch["outside"] = None
                where = f"{block_fn.name} ({box.elem_id} = {value!r})"
                assert not _watch["hits"], f"{where} touched {_watch['hits']}"
                assert SECRET not in answer, where
                assert "web UI" in answer, f"{where} was not refused: {answer[:300]!r}"
                checked += 1
    # the boxes known today: a path box added later is attacked too, without being listed here
    assert {"data-path", "data-model", "cfg-model-name_or_path", "chat-eval-data", "chat-export-out",
            "ab-prompt-file"} <= boxes
    assert checked >= 6 * len(values)


def test_a_user_path_is_made_only_by_safepaths_and_core_readers_take_only_that(tmp_path):
    from studio.tuned import evaluate, votes

    with pytest.raises(TypeError):
        safepaths.UserPath("/etc/passwd")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi", "completion": "yo", "label": true}\n')
    with pytest.raises(TypeError):
        votes.prompt_pool(data=str(f))
    with pytest.raises(TypeError):
        evaluate.held_out_rows(tmp_path, str(f))
    pool, _ = votes.prompt_pool(data=safepaths.typed(str(f)))  # the command line: typed by the user
    assert pool == ["hi"]
