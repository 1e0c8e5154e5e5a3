"""Issue 18, point 10: two processes converting the bundled model at once (two first runs started together with a
fresh studio home) both get the one whole checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

CONVERT = "from studio.models import bundled; print(bundled.ensure_checkpoint())"


def test_two_processes_converting_at_once_both_succeed(tmp_path):
    models = tmp_path / "models"
    env = dict(os.environ, KTO_STUDIO_MODELS=str(models), KTO_STUDIO_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().endswith("SmolLM2-135M-Instruct")
    target = models / "SmolLM2-135M-Instruct"
    assert (target / "done").is_file() and (target / "model.safetensors").is_file()
    assert [p.name for p in models.iterdir() if p.is_dir()] == ["SmolLM2-135M-Instruct"]  # no partial folder left
    from safetensors import safe_open

    with safe_open(str(target / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 10


WAITER = ("import sys; from studio.models import bundled; print('calling', flush=True); "
          "print(bundled.ensure_checkpoint(progress=lambda m: print(m, flush=True)), flush=True)")


def test_a_second_process_waits_for_the_converting_one(tmp_path):
    """While one process holds the conversion lock, another does not start converting into the same place; once the
    lock is let go it converts (stopped there: converting to the end is the test above's)."""
    import threading
    import time

    from filelock import FileLock

    models = tmp_path / "models"
    models.mkdir()
    env = dict(os.environ, KTO_STUDIO_MODELS=str(models), KTO_STUDIO_HOME=str(tmp_path / "home"))
    lock = FileLock(str(models / ".SmolLM2-135M-Instruct.lock"))
    lock.acquire()
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-c", WAITER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.time() + 600
        while "calling\n" not in lines and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert "calling\n" in lines, proc.stderr.read()[-2000:] if proc.poll() is not None else "no start"
        time.sleep(6)
        assert not any("Converting" in line for line in lines) and proc.poll() is None, lines
        assert not [p for p in models.iterdir() if p.is_dir()]  # nothing written while the other holds the lock
        lock.release()
        deadline = time.time() + 600
        while not any("Converting" in line for line in lines) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert any("Converting" in line for line in lines), (lines, proc.stderr.read()[-2000:])
    finally:
        if lock.is_locked:
            lock.release()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
