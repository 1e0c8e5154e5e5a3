"""Every export of a 7-8B model, on a big machine: merged, GGUF q8_0 and 4-bit, GGUF adapter, each loaded back.

    python bench/export_gpu.py                          # Llama-3.1-8B architecture; CUDA machine, ~40 GB disk
    python bench/export_gpu.py --tiny --work /tmp/x     # the same steps on a tiny config, on a CPU (a test)
    python bench/export_gpu.py --work /tmp/eg --forms nf4   # part of it (the models built once are reused)

A random-weight model of the real architecture (8.03B parameters) is written in bf16, then a copy stored in
bitsandbytes NF4 with double quantization (as the ``unsloth/*-bnb-4bit`` repos are), and a random rank-16 LoRA on
every linear layer (``bench/export_models.py``). From each storage form the studio's own export functions write:

- merged (its own check against the adapter on the base as stored must pass),
- the GGUF adapter (must be <= 200 MB and read back),
- a GGUF file: q8_0 from the 16-bit form and the 4-bit type (q4_k_m with llama.cpp's llama-quantize, else q4_0)
  from the NF4 form (``--all-gguf``: both types from both forms); the 4-bit file must be <= 5 GB.

Each output is deleted once checked, so the disk holds the base, its NF4 copy and one export at a time. A table of
step, ok, seconds and size is printed, then ``RESULT {json}``; the exit code is the number of failed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LIMITS = {"gguf-4bit": 5e9, "gguf-adapter": 200e6}  # bytes (the bounds for a 7-8B model)


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3.1-8b", help="a key of bench/random_models.py ARCHS")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama config instead (CPU test of this script)")
    ap.add_argument("--work", default=None, help="folder for the models and exports (default: a new temp folder)")
    ap.add_argument("--all-gguf", action="store_true", help="q8_0 and 4-bit GGUF from both storage forms")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--forms", default="16-bit,nf4",
                    help="storage forms to export from; with --work, a second call reuses the models the first built "
                         "(to split the run over two device calls: --forms 16-bit, then --forms nf4)")
    args = ap.parse_args(argv)

    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "gguf", "pydantic", "yaml")
               if importlib.util.find_spec(m) is None]
    if missing:  # say so before any device time is spent on building models
        print(f"missing Python packages: {', '.join(missing)} (carry their wheels)", file=sys.stderr)
        return 99
    import torch

    from bench.export_models import base_model, quantize_nf4, random_lora_run
    from bench.random_models import ARCHS
    from studio.tuned import export, gguf_quant

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    work = Path(args.work or tempfile.mkdtemp(prefix="export_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KTO_STUDIO_HOME", str(work / "home"))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    arch = "llama" if args.tiny else args.arch  # --tiny: bench/export_models.py TINY["llama"]
    spec = None if args.tiny else dict(ARCHS[arch])
    if spec is not None:
        spec.pop("original_max_position_embeddings", None)
    four_bit = "q4_k_m" if gguf_quant.llama_tool("llama-quantize") else "q4_0"
    info = {"arch": arch, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cpus": os.cpu_count(),
            "work": str(work), "free_disk_gb": round(shutil.disk_usage(work).free / 1e9, 1), "four_bit": four_bit}
    print("setup " + json.dumps(info), flush=True)
    rows: list[dict] = []

    def step(name: str, fn, limit: float | None = None):
        t = time.time()
        print(f"--- {name} ({time.strftime('%H:%M:%S')})", flush=True)
        row = {"step": name, "ok": False}
        try:
            out = fn()
            row.update(out or {})
            row["ok"] = limit is None or row.get("bytes", 0) <= limit
            if limit is not None and not row["ok"]:
                row["error"] = f"{row['bytes'] / 1e9:.3f} GB is over the limit of {limit / 1e9:.3f} GB"
        except Exception as e:  # noqa: BLE001 - a failed step is reported and the next one runs
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
            traceback.print_exc()
        row["s"] = round(time.time() - t, 1)
        if cuda:
            row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print("STEP " + json.dumps(row, default=str), flush=True)
        return row

    def progress(m: str) -> None:
        if not m.startswith(("Merged ", "Wrote ")) or m.split()[1].split("/")[0] in ("16", "128", "256"):
            print(f"    {m}", flush=True)

    bases: dict[str, str] = {}
    step("build bf16 base", lambda: {"bytes": _size(bases.setdefault(
        "16-bit", base_model(arch, str(work / "models"), spec, device)))})
    if "16-bit" not in bases:
        return _finish(rows, info)
    step("NF4 copy (double quant)", lambda: {"bytes": _size(bases.setdefault(
        "nf4", quantize_nf4(bases["16-bit"], str(work / "models" / f"{arch}-nf4"), double_quant=True)))})
    if "16-bit" not in args.forms.split(",") and "nf4" in bases and not args.work:
        shutil.rmtree(bases.pop("16-bit"), ignore_errors=True)  # the disk holds the NF4 copy and one export
    for form, base in bases.items():
        if form not in args.forms.split(","):
            continue
        run = random_lora_run(base, work / "runs" / f"run-{form.replace('-', '')}", r=args.rank,
                              alpha=2 * args.rank, std=0.02)

        def merged(run=run, form=form):
            out = work / "out" / f"merged-{form}"
            r = export.export_merged(run, out, progress=progress)
            check = r.checks["vs_adapter_model"]
            result = {"bytes": _size(out), "dtype": r.checks["dtype"], "max_logit_diff": round(check[
                "max_abs_logit_diff"], 4), "tolerance": round(check["tolerance"], 4),
                "top1": round(check["top1_agreement"], 3)}
            shutil.rmtree(out)
            return result
        step(f"merged from {form}", merged)

        def adapter(run=run, form=form):
            out = work / "out" / f"lora-{form}"
            r = export.export_gguf_adapter(run, out, progress=progress)
            result = {"bytes": r.checks["bytes"], "pairs": r.checks["pairs"],
                      "update_err": r.checks["worst_update_relative_rms_error"]}
            shutil.rmtree(out)
            return result
        step(f"gguf-adapter from {form}", adapter, LIMITS["gguf-adapter"] if not args.tiny else None)

        types = ["q8_0", four_bit] if args.all_gguf else (["q8_0"] if form == "16-bit" else [four_bit])
        for gguf_type in types:
            def gguf(run=run, form=form, gguf_type=gguf_type):
                out = work / "out" / f"gguf-{form}-{gguf_type}"
                estimate = export.estimate(run, "gguf", gguf_type)["bytes"]
                r = export.export_gguf(run, out, gguf_type=gguf_type, progress=progress)
                c = r.checks
                result = {"bytes": c["bytes"], "estimate": estimate, "type": c["gguf_type"],
                          "write_s": c["write_seconds"], "types": c["tensor_types"],
                          "err": c["worst_relative_rms_error"], "compared": c["tensors_compared"],
                          "logits": c.get("vs_adapter_model", c.get("logits")), "llama_cpp": c.get("llama_cpp")}
                shutil.rmtree(out)
                return result
            limit = LIMITS["gguf-4bit"] if gguf_type != "q8_0" and not args.tiny else None
            step(f"gguf {gguf_type} from {form}", gguf, limit)
    return _finish(rows, info)


def _finish(rows: list[dict], info: dict) -> int:
    print(f"\n{'step':34} {'ok':3} {'seconds':>8} {'size':>10}")
    for r in rows:
        size = f"{r['bytes'] / 1e9:.3f} GB" if r.get("bytes") else ""
        print(f"{r['step']:34} {'yes' if r['ok'] else 'NO':3} {r['s']:8.1f} {size:>10}  {r.get('error', '')}")
    print("RESULT " + json.dumps({**info, "steps": rows}, default=str), flush=True)
    return sum(not r["ok"] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
