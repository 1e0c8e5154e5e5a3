"""Issue 18, point 10: two processes converting the bundled model at once (two first runs started together with a
fresh studio home) both get the one whole checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

CONVERT = "from studio import bundled; print(bundled.ensure_checkpoint())"


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
