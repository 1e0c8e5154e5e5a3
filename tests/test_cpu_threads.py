"""A living thread's torch work leaves no OpenMP workers behind once it is done (studio.models.cpu_threads).

With libgomp, every thread that ran a parallel kernel keeps a team of workers while it lives; once the teams outnumber
the cores, every team's kernels slow down (bench/cpu_threads.py: 2x a training step on 2 cores). Gradio's worker
threads live on, so the core entry points they call give their team back."""
from __future__ import annotations

import os
import threading
import time

import pytest

from studio.models import cpu_threads


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _workers_left_by(work) -> int:
    """OS threads the process gained from ``work`` run in a thread that then stays alive (as a Gradio worker does)."""
    import torch

    out: list[int] = []
    done, hold = threading.Event(), threading.Event()

    def living() -> None:
        torch.set_num_threads(2)
        before = _tasks()
        work()
        # threads the work started that are still there (others may end meanwhile: not counted); a worker given
        # back exits on its own schedule: wait for it (at most 2 s; a kept one never goes)
        deadline = time.monotonic() + 2
        while _tasks() - before and time.monotonic() < deadline:
            time.sleep(0.02)
        out.append(len(_tasks() - before))
        done.set()
        hold.wait()

    t = threading.Thread(target=living)
    t.start()
    done.wait(60)
    hold.set()
    t.join()
    return out[0]


def _parallel_math() -> None:
    import torch

    torch.ones(2**22).sum()  # above ATen's grain size: an OpenMP parallel region


def test_work_in_a_living_thread_gives_its_openmp_team_back():
    if not cpu_threads.supported():
        pytest.skip("torch does not use libgomp here (no per-thread teams to give back)")
    # the control: without the release, the thread's team stays (one worker beside the thread itself)
    assert _workers_left_by(_parallel_math) >= 1
    assert _workers_left_by(cpu_threads.released(_parallel_math)) == 0


def test_a_released_generator_gives_the_team_back_when_it_ends():
    if not cpu_threads.supported():
        pytest.skip("torch does not use libgomp here")

    def chunks():
        _parallel_math()
        yield 1
        _parallel_math()
        yield 2

    assert _workers_left_by(lambda: list(cpu_threads.released(chunks)())) == 0


def test_the_entry_points_a_ui_thread_calls_give_their_team_back():
    from studio.models import bundled
    from studio.tuned import chat, evaluate, export

    for fn in (bundled.ensure_checkpoint, chat.ChatModel.use, evaluate.evaluate_run, export.export):
        assert getattr(fn, "releases_cpu_threads", False), fn.__qualname__


def test_a_release_before_torch_is_imported_does_not_switch_later_releases_off():
    """The bundled model's check returns at once when it is converted, before torch is imported in the process: that
    first release must not settle that there is no libgomp to release. In a fresh process: release, import torch,
    work in a living thread, release there; no worker stays."""
    import subprocess
    import sys
    from pathlib import Path

    if not cpu_threads.supported():
        pytest.skip("torch does not use libgomp here")
    script = """
import sys
from studio.models import cpu_threads
cpu_threads.release()  # torch not imported yet
assert "torch" not in sys.modules
from tests.test_cpu_threads import _parallel_math, _workers_left_by
print("LEFT", _workers_left_by(cpu_threads.released(_parallel_math)))
"""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LEFT 0" in r.stdout, r.stdout
