"""No non-finite adapter is ever saved as the result (issue 28, case 5): a checkpoint with NaN weights is skipped on
resume with the reason; a run stops at the first non-finite gradient or weight and rolls back to its last good
checkpoint, with or without a held-out split; its state, done event and history row say "failed". CPU, on a tiny random
model with the bundled tokenizer: the engine's guard and roll-back are under test, not what a model learns."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from studio.config.run import ConfigError
from studio.runs import checkpoints, folder
from tests.conftest import tiny_run_config

NAN = {"F32": struct.pack("<f", float("nan")), "F16": b"\x00\x7e", "BF16": b"\xc0\x7f"}


def poison_first_tensor(f):
    """Overwrite the first tensor of a safetensors file with NaN, keeping the file's size (as a damaged disk
    would)."""
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name, info = min(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    lo, hi = (8 + n + o for o in info["data_offsets"])
    pattern = NAN[info["dtype"]]
    raw[lo:hi] = pattern * ((hi - lo) // len(pattern))
    f.write_bytes(bytes(raw))
    return name


class PoisonAtStep:
    """Makes one gradient NaN just before the optimizer step that ends at ``step`` (after the studio's own check of
    the gradients, so the weights become NaN: the step-end check must catch it)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        target = step

        class _Poison(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if state.global_step + 1 == target:
                    p = next(p for p in model.parameters() if p.requires_grad)
                    p.grad = torch.full_like(p, float("nan"))

        self.callback = _Poison()


@pytest.mark.parametrize("held_out", [0.0, 0.25], ids=["no-held-out", "held-out"])
def test_a_run_that_turns_nan_stops_rolls_back_and_fails(tmp_path, tiny_model_dir, held_out):
    from studio.runs.history import History
    from studio.training.engine import Engine

    history = History()
    engine = Engine(on_event=history.record)
    # the earliest step that proves the roll-back: step 1 is checkpointed, step 2 (also a save step) turns NaN and
    # must not be; max_steps 3 so that the run is stopped by the NaN, not by its end
    engine.extra_callbacks = [PoisonAtStep(2).callback]
    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 3,
                                       "train.save_steps": 1, "data.eval_fraction": held_out, "train.logging_steps": 1})
    job = engine.start(cfg)
    engine.wait(900)
    assert job.state == "failed", job.error
    done = [e for e in job.events if e["type"] == "done"][-1]
    assert done["state"] == "failed" and "step 2" in done["message"] and "checkpoint-1" in done["message"]
    assert "learning_rate" in done["message"]
    run_dir = cfg.run_dir()
    # the NaN step was never checkpointed; the adapter is checkpoint-1's, finite
    assert [p.name for p in checkpoints.candidates(run_dir)] == ["checkpoint-1"]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    good = load_file(str(run_dir / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert all(torch.equal(adapter[k], good[k]) for k in good)
    assert history.runs()[0]["status"] == "failed"

    # a checkpoint whose weights are NaN (size kept) is never resumed: the reason is given
    name = poison_first_tensor(run_dir / "checkpoint-1" / "adapter_model.safetensors")
    why = checkpoints.problem(run_dir / "checkpoint-1")
    assert why and "NaN" in why and name in why
    with pytest.raises(ConfigError, match="checkpoint-1 skipped: adapter_model.safetensors holds NaN"):
        folder.resume_point(run_dir, "latest")
