"""What holds the GPU at a script's peak: runs a bench script with CUDA's allocator history on, then replays the
history to the moment of the highest allocated total and sums the live blocks by where they were allocated.

    python bench/mem_trace.py --top 25 -- .whl/anchor_kto.py --path unsloth --arch mistral-7b --seq 2048 --bs 2
    python bench/mem_trace.py -- bench/engine_gpu.py --backend unsloth --arch mistral-7b --seq 2048 --bs 2

Prints the script's own output, then ``TRACE {...}`` (JSON): the peak in GiB, how many allocator events came before
it, and the live bytes at that moment grouped by the innermost frame in a known library (the code that asked for
the memory) and by a short stack. Two runs' TRACE lines side by side show which tensors one holds that the other
does not. Recording Python stacks slows the run; use it to find memory, not to time.
"""
from __future__ import annotations

import argparse
import collections
import json
import runpy
import sys

LIBS = ("/trl/", "/unsloth", "/peft/", "/transformers/", "/studio/", "anchor_kto", "/bitsandbytes/", "/accelerate/",
        "/torch/optim", "/torch/utils/checkpoint", "/torch/nn/")


def _where(frames: list[dict], depth: int) -> str:
    """The innermost `depth` frames inside a known library ('?' if none)."""
    picked = [f for f in frames if any(k in f.get("filename", "") for k in LIBS)][:depth]
    if not picked:
        return "?"
    return " < ".join(f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f['line']}"
                      f" {f['name']}" for f in picked)


def peak_blocks(trace: list[dict]) -> tuple[int, int, dict[int, tuple[int, list]]]:
    """(index of the event at the peak, allocated bytes then, live blocks then: addr -> (size, frames))."""
    total = best = 0
    best_i = -1
    sizes: dict[int, int] = {}
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
            if total > best:
                best, best_i = total, i
        elif e["action"] == "free_completed" and e["addr"] in sizes:
            total -= sizes.pop(e["addr"])
    live: dict[int, tuple[int, list]] = {}
    for e in trace[:best_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    return best_i, best, live


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--max-entries", type=int, default=3_000_000)
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    a = ap.parse_args()
    argv = a.script[1:] if a.script[:1] == ["--"] else a.script
    if not argv:
        raise SystemExit("usage: mem_trace.py [--top N] -- SCRIPT [ARGS...]")

    import torch

    torch.cuda.memory._record_memory_history(max_entries=a.max_entries, stacks="python")
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit:
        pass
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][0]
    i, best, live = peak_blocks(trace)
    by_site: collections.Counter = collections.Counter()
    by_stack: collections.Counter = collections.Counter()
    for size, frames in live.values():
        by_site[_where(frames, 1)] += size
        by_stack[_where(frames, a.depth)] += size
    mib = 2**20
    # an allocation that failed (CUDA out of memory): how much it asked for and the code that asked
    ooms = [{"size_mib": round(e.get("size", 0) / mib, 1), "where": _where(e.get("frames", []), a.depth)}
            for e in trace if e["action"] == "oom"]
    out = dict(script=argv, ooms=ooms, events=len(trace), peak_event=i, peak_gib=round(best / 2**30, 3),
               max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               live_blocks=len(live), history_full=len(trace) >= a.max_entries,
               by_site={k: round(v / mib, 1) for k, v in by_site.most_common(a.top)},
               by_stack={k: round(v / mib, 1) for k, v in by_stack.most_common(a.top)},
               sizes_mib=sorted((round(s / mib, 2) for s, _ in live.values()), reverse=True)[:40])
    print("TRACE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
