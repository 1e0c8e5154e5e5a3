"""Checkpoints that are either whole or absent, resume that picks one that loads, and a full disk said plainly.

transformers' Trainer (5.17) writes ``checkpoint-N`` in place, file by file: a crash or a full disk leaves a partial
folder under the real name, and resuming "from the latest" then picks it. ``atomic_saves(trainer)`` makes each
checkpoint go to ``.saving-checkpoint-N/checkpoint-N`` and be renamed to ``checkpoint-N`` once complete; a save that
fails removes its partial folder, and a full disk raises ``DiskFull`` with the folder, the free space and about how
much a checkpoint needs. ``problem(path)`` says what is wrong with a checkpoint folder (None when it is readable
and its weights are finite), and ``latest(run_dir)`` picks the newest readable one, with the ones it skipped and why.
"""
from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

STAGING_PREFIX = ".saving-"
_FULL_MARKERS = ("No space left on device", "unexpected pos", "PytorchStreamWriter failed", "file write failed",
                 "StorageFull", "Disk quota exceeded")


class DiskFull(OSError):
    """The disk filled up while saving; the message names the folder, the free space and what is needed."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


PREFIX = "checkpoint-"


def step_of(path: str | Path) -> int | None:
    name = Path(path).name
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if name.startswith(PREFIX) and tail.isdigit() else None


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{step}"


def _safetensors_problem(f: Path) -> str | None:
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} is cut off"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return f"{f.name} is cut off"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{f.name} cannot be read"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{f.name} is cut off ({size} of {8 + n + end} bytes)"
    return None


def non_finite_problem(f: Path) -> str | None:
    """A whole safetensors file whose tensors hold NaN or infinity (a damaged or diverged checkpoint)."""
    try:
        import torch
        from safetensors import safe_open

        bad = []
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(name)
    except Exception as e:  # noqa: BLE001 - a file safetensors cannot read is damaged too
        return f"{f.name} cannot be read ({e})"
    if bad:
        return (f"{f.name} holds NaN or infinite values in {len(bad)} tensor{'s' if len(bad) > 1 else ''} "
                f"(first: {bad[0]})")
    return None


def _torch_file_problem(f: Path) -> str | None:
    """torch.save writes a zip archive: check it is whole (every member's CRC)."""
    try:
        if not zipfile.is_zipfile(f):
            return f"{f.name} is not a complete torch file"
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
        return f"{f.name} is damaged ({bad})" if bad else None
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        return f"{f.name} cannot be read ({e})"


def problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being resumed (a missing or cut-off file), or None when it looks whole."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        return "trainer_state.json is missing (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is damaged"
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        return "it holds no model weights"
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            why = _safetensors_problem(f) or non_finite_problem(f)
        elif f.suffix in (".pt", ".pth", ".bin"):
            why = _torch_file_problem(f)
        else:
            continue
        if why:
            return why
    return None


def candidates(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p), reverse=True)


def latest(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that is whole, and the newer ones skipped with the reason."""
    skipped = []
    for p in candidates(run_dir):
        why = problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


# ---- a full disk ---------------------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and getattr(exc, "errno", None) == 28):
            return True
        if any(m in str(exc) for m in _FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def disk_full(folder: Path, needed: int | None) -> DiskFull:
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    need = f"; a checkpoint needs about {_gib(needed)}" if needed else ""
    have = f" (the disk holding it has {_gib(free)} free)" if free is not None else ""
    try:
        done = latest(folder)[0] if folder.is_dir() else None
    except OSError:
        done = None
    then = (f"then resume the run: it continues from its newest complete checkpoint ({done.name})" if done else
            "then start the run again: no checkpoint was complete yet, so there is nothing to resume from")
    return DiskFull(28, f"The disk is full: saving into {folder} failed{have}{need}. Free some space there (or "
                        f"delete old runs' files in the run history), {then}")


def _needed(trainer, run_dir: Path) -> int | None:
    done, _ = latest(run_dir)
    if done is not None:
        return _size(done)
    try:  # the trainable weights, Adam's two moments, and a little more
        n = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
        return int(n * 3.2) or None
    except Exception:
        return None


# ---- atomic checkpoint saves ------------------------------------------------------------------------------------

def atomic_saves(trainer, seam, mark=None) -> None:
    """Make ``trainer`` write each checkpoint under a temporary name and rename it when it is complete.
    ``seam``: studio.training.trl_seam, the one module that reaches the Trainer's private members (this module sits
    below training/). ``mark(folder)``, when given, adds to each complete checkpoint before it is published (the
    run's id)."""
    from transformers.trainer_utils import rotate_checkpoints

    original = seam.checkpoint_save(trainer)
    if trainer.args.should_save:  # saves a killed process left half done (the run folder is claimed: ours)
        for p in Path(trainer.args.output_dir).glob(f"{STAGING_PREFIX}{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    def save(model, trial=None):
        run_dir = Path(seam.output_dir(trainer, trial))
        step = trainer.state.global_step
        final = checkpoint_dir(run_dir, step)
        staging = run_dir / f"{STAGING_PREFIX}{final.name}"
        main = trainer.args.should_save
        if main and staging.exists():
            shutil.rmtree(staging)
        try:
            with seam.output_dir_as(trainer, staging):
                original(model, trial)
        except BaseException as exc:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            if is_disk_full(exc):
                raise disk_full(run_dir, _needed(trainer, run_dir)) from exc
            raise
        trainer.accelerator.wait_for_everyone()
        if main:
            tmp = staging / final.name
            if trainer.state.best_model_checkpoint and Path(trainer.state.best_model_checkpoint).parent == staging:
                trainer.state.best_model_checkpoint = str(final)
                trainer.state.save_to_json(str(tmp / "trainer_state.json"))
            if mark is not None:
                mark(tmp)
            from studio import atomic

            atomic.publish_dir(tmp, final)  # replaces a folder of the same step from an earlier, replayed save
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
        trainer.accelerator.wait_for_everyone()

    seam.replace_checkpoint_save(trainer, save)
