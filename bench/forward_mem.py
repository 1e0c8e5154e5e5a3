"""Memory and speed of KTO's no-gradient passes (reference and KL log-probs) by rows per pass, on a GPU.

    python3 bench/forward_mem.py --arch mistral-7b --backend unsloth --seqs 1024 2048 --rows 1 2 4 8 16

The model is loaded the way the engine loads it (studio.models.load_for_training: random weights of the real
architecture from bench/random_models.py, LoRA on every projection) with TRL's fused LM head, as KTOTrainer patches
it. For each sequence length and number of rows, one forward pass without gradients, scored on the second half of
each row as KTO scores completions. Prints one RESULT line per point: the peak allocated memory above what was
allocated before the pass (GiB and bytes per token), and the pass's median time over 3 repeats (tokens/s), so that
``studio.training.memory`` can size the precompute pass (``forward_rows``) and its calibration can be checked.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--backend", choices=["unsloth", "bnb"], default="unsloth")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--cap-gib", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--autocast", action="store_true", help="under torch.autocast(bf16), as TRL's precompute runs")
    a = ap.parse_args()
    if a.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from bench.random_models import make_model_dir
    from studio.config.run import RunConfig
    from studio.models.load import load_for_training

    model_dir = make_model_dir(a.arch)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total))
    cfg = RunConfig().updated({"model.name_or_path": model_dir, "model.backend": a.backend,
                               "lora.r": 16, "lora.lora_alpha": 16, "kto.max_length": max(a.seqs)})
    loaded = load_for_training(cfg)
    model = loaded.model
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits"))
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    for seq in a.seqs:
        for rows in a.rows:
            ids = torch.randint(100, vocab - 100, (rows, seq), generator=g).cuda()
            mask = torch.ones_like(ids)
            labels = ids.clone()
            labels[:, : seq // 2] = -100
            point = dict(arch=a.arch, backend=a.backend, autocast=a.autocast, seq=seq, rows=rows, tokens=rows * seq, cap_gib=a.cap_gib)
            times = []
            try:
                for _ in range(a.repeats + 1):
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    t = time.perf_counter()
                    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.autocast)
                    with torch.no_grad(), amp:
                        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
                        out.log_probs.sum().item()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                    peak = torch.cuda.max_memory_allocated() - base
                    del out
                med = statistics.median(times[1:])
                point.update(ok=True, base_gib=round(base / 2**30, 3), extra_gib=round(peak / 2**30, 3),
                             extra_bytes_per_token=round(peak / (rows * seq), 1), pass_s=round(med, 4),
                             tok_per_s=round(rows * seq / med, 1))
            except torch.OutOfMemoryError as e:
                point.update(ok=False, error="OOM: " + str(e).split("\n")[0][:160])
            torch.cuda.empty_cache()
            print("RESULT " + json.dumps(point), flush=True)


if __name__ == "__main__":
    main()
