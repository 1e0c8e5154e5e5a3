"""A living thread's torch work leaves no OpenMP workers behind once it is done (studio.models.cpu_threads).

With libgomp, every thread that ran a parallel kernel keeps a team of workers while it lives; once the teams outnumber
the cores, every team's kernels slow down (bench/cpu_threads.py: 2x a training step on 2 cores). Gradio's worker
threads live on, so the core entry points they call give their team back."""
from __future__ import annotations

import os
import threading

import pytest

from studio.models import cpu_threads


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _workers_left_by(work) -> int:
    """OS threads the process gained from ``work`` run in a thread that then stays alive (as a Gradio worker does)."""
    import torch

    out: list[int] = []
    done, hold = threading.Event(), threading.Event()

    def living() -> None:
        torch.set_num_threads(2)
        before = _tasks()
        work()
        out.append(_tasks() - before)
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


def test_a_release_before_torch_is_imported_does_not_switch_later_releases_off(monkeypatch):
    """The bundled model's check returns at once when it is converted, before torch is imported in the process: that
    first release must not settle that there is no libgomp to release."""
    import sys

    import torch  # noqa: F401

    if not cpu_threads.supported():
        pytest.skip("torch does not use libgomp here")
    monkeypatch.setattr(cpu_threads, "_looked", False)
    monkeypatch.setattr(cpu_threads, "_libgomp", None)
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "torch")
        cpu_threads.release()  # as if torch were not imported yet: nothing to give back, nothing decided
    assert cpu_threads._gomp() is not None
