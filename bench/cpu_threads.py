"""What an OpenMP team left in a living thread costs the training thread, and what ``cpu_threads.release`` gives back.

    python bench/cpu_threads.py [--steps 5] [--length 64]

Times a LoRA forward and backward of the bundled model (2 rows, bf16 autocast where the CPU multiplies bf16 natively,
as a first run trains) in a fresh thread, three ways: with no other thread holding OpenMP workers; while a second,
living thread (as a Gradio worker is) holds the team its own torch work made; after that thread called
``studio.models.cpu_threads.release``. Prints seconds a step and the ratios. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--length", type=int, default=64)
    a = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from studio.models import bundled, cpu_threads
    from studio.models.load import cpu_bf16

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(bundled.ensure_checkpoint(), dtype=torch.float32),
                           LoraConfig(r=16, target_modules="all-linear"))
    ids = torch.randint(0, model.config.vocab_size, (2, a.length))
    bf16 = cpu_bf16()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
        logits.float().logsumexp(-1).mean().backward()

    def timed() -> float:
        out: list[float] = []

        def run() -> None:
            step()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            out.append((time.perf_counter() - t0) / a.steps)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return out[0]

    alone = timed()
    made, release, hold = threading.Event(), threading.Event(), threading.Event()

    def living_ui_thread() -> None:  # a Gradio worker that loaded a model, then stays in its pool
        torch.ones(2**22).sum()
        step()
        made.set()
        release.wait()
        cpu_threads.release()
        made.set()
        hold.wait()

    ui = threading.Thread(target=living_ui_thread)
    ui.start()
    made.wait()
    made.clear()
    beside = timed()
    release.set()
    made.wait()
    after = timed()
    hold.set()
    ui.join()
    print(f"cores {os.cpu_count()} · torch threads {torch.get_num_threads()} · libgomp teams releasable "
          f"{cpu_threads.supported()} · bf16 autocast {bf16} · 2 rows x {a.length} tokens")
    print(f"training thread alone:                        {alone:.3f} s a step")
    print(f"beside a living thread that holds its team:    {beside:.3f} s a step ({beside / alone:.2f}x)")
    print(f"after that thread called cpu_threads.release: {after:.3f} s a step ({after / alone:.2f}x)")


if __name__ == "__main__":
    main()
