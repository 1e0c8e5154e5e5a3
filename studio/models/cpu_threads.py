"""Giving back the CPU worker threads that torch math leaves in the thread that did it.

On Linux, torch runs its CPU kernels on GNU OpenMP (libgomp), which keeps one team of worker threads for every thread
that has run a parallel kernel, for as long as that thread lives. Once the worker threads of all teams outnumber the
cores, libgomp stops letting idle workers spin and every team's kernels wait on the kernel's scheduler instead: a LoRA
step of the bundled model on 2 cores then takes twice as long (``python bench/cpu_threads.py``: 1.00 s against 0.49 s
a forward and backward; a first run's training step 7.9 s against 4.3-4.6 s when the bundled model was converted in
another living thread first).

That is exactly what an app does by default: the bundled model is converted, a chat model loaded or a run evaluated
in a Gradio worker thread, which stays in Gradio's pool, while training runs in the engine's own thread. A thread that
ends gives its team back by itself (the engine's, Chat's generation thread); ``released`` gives it back when the work
ends in a thread that goes on living. The next kernel in that thread builds a new team (a fraction of a millisecond).
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import sys
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the calling thread's team, not only put it to sleep
_libgomp: Any = None
_looked = False


def _gomp():
    """torch's libgomp when the process has it loaded (Linux builds of torch), else None: elsewhere (macOS's libomp,
    Windows) nothing is given back, since nothing was measured there."""
    global _libgomp, _looked
    if not _looked:
        if "torch" not in sys.modules:  # torch has run nothing yet (nothing to give back); look again later
            return None
        _looked = True
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                if hasattr(lib, "omp_pause_resource_all"):
                    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                    _libgomp = lib
                    break
        except OSError:  # no /proc (not Linux) or an unreadable library: nothing to release
            _libgomp = None
    return _libgomp


def supported() -> bool:
    """Whether this process's torch keeps per-thread OpenMP teams that ``release`` can give back."""
    import torch  # noqa: F401 - loads libgomp where torch uses it

    return _gomp() is not None


def release() -> None:
    """Give back the calling thread's OpenMP worker threads (no-op where torch does not use libgomp). Call it in a
    long-lived thread when its torch work is done, never inside a torch kernel."""
    lib = _gomp()
    if lib is not None:
        rc = lib.omp_pause_resource_all(OMP_PAUSE_HARD)
        if rc != 0:
            log.debug("omp_pause_resource_all returned %s", rc)


def released(fn: F) -> F:
    """``fn`` (a function or a generator function) followed by ``release()`` in the thread that ran it, when it
    returns, raises or its generator ends. For core entry points a UI thread calls: model loading, evaluation,
    export, the bundled model's conversion."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            finally:
                release()

        gen_wrapper.releases_cpu_threads = True  # type: ignore[attr-defined]
        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release()

    wrapper.releases_cpu_threads = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
