"""Giving a finished run's GPU memory back, even when something still holds its model.

After a run the engine drops the trainer and collects garbage (``studio.models.load.free_memory``). On an 8 GB card
every GiB a finished run keeps decides whether the Chat tab's model or an export's check fits, and a reference held
anywhere (a library's cache, a callback, a traceback) would keep the whole model alive. ``release`` measures what the
run left allocated beyond what was allocated before it; when its model is still alive it names who holds it (for
the debug log) and empties every parameter and buffer in place, so the memory goes back whoever holds the module.
``import_before_models`` keeps one such holder from forming (bitsandbytes' logged import error);
``optimizer_overrides`` / ``forget_optimizer_overrides`` undo another (bitsandbytes' optimizer registry, which keeps
each run's embedding matrix for good: measured on the GPU, 256 MiB a run for Mistral-7B, 1 GiB for Llama-3.1-8B).
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)
MIB = 2**20
SLACK = 64 * MIB  # allocator granularity, cuBLAS workspaces and small caches a run may leave: not a leftover


def import_before_models() -> None:
    """Import bitsandbytes and PEFT's bitsandbytes layers in a thread of their own, once. PEFT imports them lazily,
    in the middle of wrapping a model, and bitsandbytes logs a failed optional kernel import with the exception as
    the message's argument: a log handler that keeps records (a test runner's) then keeps that exception's traceback,
    its frames and their callers' frames, and so the model those callers hold, for good. In a fresh thread the
    callers are only the thread's own start-up."""
    import threading

    def imports() -> None:
        for name in ("bitsandbytes", "peft.tuners.lora.bnb"):
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a broken optional install is reported where it is used
                    pass

    if "peft.tuners.lora.bnb" not in sys.modules or "bitsandbytes" not in sys.modules:
        t = threading.Thread(target=imports, name="studio-imports", daemon=True)
        t.start()
        t.join()


def optimizer_overrides() -> tuple[int, set, set]:
    """A mark of bitsandbytes' optimizer registry before a run. The HF Trainer, building an 8-bit optimizer, registers
    every ``nn.Embedding`` of the model with bitsandbytes' process-wide ``GlobalOptimManager`` (``(module, 'weight',
    config)``: keep that matrix's optimizer state in 32 bits) and never takes it back, so the registry holds each run's
    embedding module, and its vocabulary x hidden weight, as long as the process lives."""
    mgr = _optim_manager()
    if mgr is None:
        return (0, set(), set())
    return (len(mgr.module_weight_config_triple), set(mgr.pid2config), set(mgr.index2config))


def forget_optimizer_overrides(mark: tuple[int, set, set] | None) -> int:
    """Drop what was registered with bitsandbytes' optimizer registry since ``mark`` (``optimizer_overrides``):
    after the run nothing reads it. Returns how many modules it let go."""
    mgr = _optim_manager()
    if mgr is None or mark is None:
        return 0
    n, pids, indexes = mark
    dropped = len(mgr.module_weight_config_triple[n:])
    del mgr.module_weight_config_triple[n:]
    for key in set(mgr.pid2config) - pids:
        del mgr.pid2config[key]
    for key in set(mgr.index2config) - indexes:
        del mgr.index2config[key]
    return dropped


def _optim_manager():
    """bitsandbytes' optimizer registry when bitsandbytes is loaded (never imported here for it)."""
    optim = sys.modules.get("bitsandbytes.optim.optimizer")
    manager = getattr(optim, "GlobalOptimManager", None)
    if manager is None or not hasattr(manager, "get_instance"):
        return None
    mgr = manager.get_instance()
    return mgr if isinstance(getattr(mgr, "module_weight_config_triple", None), list) else None


def cuda_allocated() -> int:
    """Bytes this process has allocated on the current GPU (0 without one)."""
    try:
        import torch

        return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not fail a run's end
        return 0


def empty_in_place(model) -> int:
    """Replace every parameter's and buffer's storage of ``model`` with an empty tensor (same dtype and device);
    returns the bytes that storage held. The module objects stay, hollow: whatever still references them holds
    nothing big."""
    import torch

    freed = 0
    with torch.no_grad():
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for t in store.values():
                    if t is None or t.numel() == 0:
                        continue
                    freed += t.numel() * t.element_size()
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                    if getattr(t, "grad", None) is not None:
                        t.grad = None
    return freed


def holders(obj: Any, depth: int = 5, limit: int = 6) -> list[str]:
    """Who references ``obj``, as chains of short descriptions up to ``depth`` links (modules' globals, this
    search's own frames and lists skipped)."""
    import types

    mine: set[int] = set()  # this search's own containers, which get_referrers finds too
    seen: set[int] = {id(obj)}
    chains: list[str] = []
    mine.update((id(seen), id(chains), id(mine)))

    def label(r, o) -> str:
        if isinstance(r, dict):
            key = next((str(k) for k, v in r.items() if v is o), "?")
            return f"dict[{key!r}]"
        if isinstance(r, types.FunctionType):
            return f"function {r.__module__}.{r.__qualname__}"
        if isinstance(r, types.FrameType):
            return f"frame {r.f_code.co_name} ({r.f_code.co_filename.rsplit('/', 1)[-1]}:{r.f_lineno})"
        if isinstance(r, types.MethodType):
            return f"method {type(r.__self__).__qualname__}.{r.__func__.__qualname__}"
        return type(r).__module__.split(".")[0] + "." + type(r).__qualname__

    def walk(o, path: list[str], level: int) -> None:
        if len(chains) >= limit:
            return
        found = gc.get_referrers(o)
        mine.add(id(found))
        refs = [r for r in found if id(r) not in mine and id(r) not in seen
                and not isinstance(r, types.ModuleType)
                and not (isinstance(r, types.FrameType) and r.f_code.co_filename == __file__)
                and not (isinstance(r, dict) and "__builtins__" in r)]  # a module's globals: the names it defines
        mine.add(id(refs))
        del found
        if level >= depth or not refs:
            chains.append(" <- ".join(path))
            return
        for r in refs[:3]:
            seen.add(id(r))
            walk(r, path + [label(r, o)], level + 1)

    walk(obj, [type(obj).__module__.split(".")[0] + "." + type(obj).__qualname__], 0)
    return chains


def storage_refs(model) -> list[tuple[str, Any]]:
    """Weak references to the storage of each of ``model``'s big parameters and buffers (more than ``SLACK``), by
    name: after the run, whichever is not expired is held somewhere even though the module that owned it is gone."""
    from torch.multiprocessing.reductions import StorageWeakRef

    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.numel() * t.element_size() > SLACK:
            out.append((name, StorageWeakRef(t.untyped_storage())))
    return out


def largest_cuda_tensors(n: int = 4) -> list[dict[str, Any]]:
    """The ``n`` largest CUDA tensors Python objects still reference (none: the memory is held inside a library or
    an autograd graph, out of Python's sight), with who holds each."""
    import torch

    import warnings

    seen: dict[int, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some modules' lazy attributes warns of deprecations
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.is_cuda and o.numel() * o.element_size() > SLACK:
                    seen[id(o)] = o
            except Exception:  # noqa: BLE001 - half-built objects during collection
                continue
    out = []
    for t in sorted(seen.values(), key=lambda t: -t.numel() * t.element_size())[:n]:
        out.append({"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                    "mib": round(t.numel() * t.element_size() / MIB, 1), "requires_grad": bool(t.requires_grad),
                    "grad_fn": type(t.grad_fn).__name__ if t.grad_fn is not None else None,
                    "holders": holders(t, depth=4, limit=3)})
    seen.clear()
    return out


def allocation_sites(n: int = 4, frames: int = 14) -> list[dict[str, Any]]:
    """Where the ``n`` largest live CUDA blocks (over ``SLACK``) were allocated: the Python stack of each, innermost
    first, when CUDA's allocator history is being recorded (``torch.cuda.memory._record_memory_history``, which a
    benchmark turns on); empty otherwise. Memory an autograd graph or a library's C++ side holds is out of
    ``gc``'s sight, but not out of the allocator's."""
    import torch

    try:
        snap = torch.cuda.memory._snapshot()
    except Exception:  # noqa: BLE001 - no GPU, or a build without the allocator's snapshot
        return []
    blocks = [b for seg in snap.get("segments", []) for b in seg.get("blocks", [])
              if b.get("state") == "active_allocated" and b.get("size", 0) > SLACK and b.get("frames")]
    out = []
    for b in sorted(blocks, key=lambda b: -b["size"])[:n]:
        stack = [f"{f.get('name')} ({'/'.join(str(f.get('filename', '?')).rsplit('/', 2)[-2:])}:{f.get('line')})"
                 for f in b["frames"] if not str(f.get("filename", "")).startswith("<")]
        out.append({"mib": round(b["size"] / MIB, 1), "stack": stack[:frames]})
    return out


def release(model_ref: Callable[[], Any] | None, before: int, free: Callable[[], None],
            storages: list[tuple[str, Any]] | None = None) -> dict[str, Any] | None:
    """After a run whose engine dropped its references and called ``free``: when the GPU holds more than ``before``
    (plus ``SLACK``) and the run's model (``model_ref``, a weak reference) is still alive, say who holds it, empty it
    in place and ``free`` again. Returns what was found ({allocated_before_mib, left_mib, emptied_mib,
    allocated_after_mib, holders}), or None when nothing was left over (or there is no GPU)."""
    left = cuda_allocated() - before
    model = model_ref() if model_ref is not None else None
    if left <= SLACK and model is None:
        return None
    found: dict[str, Any] = {"allocated_before_mib": round(before / MIB, 1), "left_mib": round(max(left, 0) / MIB, 1),
                             "emptied_mib": 0.0, "holders": []}
    if model is not None:
        found["holders"] = holders(model)
        found["emptied_mib"] = round(empty_in_place(model) / MIB, 1)
        del model
        free()
    found["allocated_after_mib"] = round(cuda_allocated() / MIB, 1)
    if cuda_allocated() - before > SLACK:  # still left: which tensors Python can see, and who holds them
        found["cuda_tensors"] = largest_cuda_tensors()
        found["weights_still_stored"] = [name for name, ref in storages or [] if not ref.expired()]
        sites = allocation_sites()
        if sites:
            found["allocated_by"] = sites
    if found["emptied_mib"] or left > SLACK:
        log.warning("the finished run left %.0f MiB on the GPU; its model was %s (%.0f MiB emptied in place); "
                    "held by: %s", found["left_mib"], "alive" if found["holders"] else "gone",
                    found["emptied_mib"], "; ".join(found["holders"]) or "-")
    return found
