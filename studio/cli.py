"""Headless command line: ``python -m studio <command>``.

- ``train RUN.yaml``   train with the same engine as the UI (also under ``accelerate launch -m studio train``)
- ``data FILE``        convert and clean a data file, print a JSON summary
- ``fit``              choose sequence length / batch that fit a GPU, print the memory estimate as JSON
- ``eval RUN_DIR``     held-out evaluation of a run, as JSON
- ``export RUN_DIR``   export the adapter, a merged model or a GGUF file
- ``votes``            blind A/B votes: tallies and 95% intervals as JSON, the votes as CSV
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio", description="KTO Studio, headless.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run config (YAML) and write the adapter to its run folder")
    p.add_argument("config", help="run config YAML, e.g. presets/runs/quickstart.yaml")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the run's latest checkpoint (or the given checkpoint folder)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field, e.g. --set train.max_steps=10 (YAML value syntax)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="convert and clean a data file; print a JSON summary "
                                   "(exit 1: the file can't be used; 2: usage error)")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="where to write the cleaned JSONL (never the input file)")
    p.add_argument("--model", default=None, help="model id or path whose tokenizer measures lengths")
    p.add_argument("--max-length", type=int, default=None, help="token limit: longer rows are reported/dropped")
    p.add_argument("--map", action="append", default=[], metavar="THEIRS=OURS",
                   help="column mapping, e.g. --map question=prompt --map answer=completion --map rating=label")
    p.add_argument("--keep-duplicates", action="store_true", help="keep repeated rows and rows labelled both ways")
    p.add_argument("--keep-empty", action="store_true", help="keep rows whose completion is empty")
    p.add_argument("--drop-over-length", action="store_true",
                   help="drop rows longer than --max-length (else the trainer truncates them)")
    p.set_defaults(func=_lazy("studio.data.clean", "cli"))

    p = sub.add_parser("fit", help="auto-fit sequence length and batch to a GPU; print the estimate as JSON")
    p.add_argument("--model", required=True, help="hub id, local folder, preset name or config.json")
    p.add_argument("--gpu-gib", type=float, required=True, help="GPU memory to fit in, GiB (e.g. 7.5 for 8 GB)")
    p.add_argument("--seq", type=int, default=None, help="fix the sequence length instead of searching")
    p.add_argument("--backend", choices=["unsloth", "bnb", "full"], default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-ceiling", type=int, default=None, help="longest max_length auto-fit may pick (default 4096)")
    p.add_argument("--effective-batch", type=int, default=16, help="rows per optimizer step, kept via gradient accumulation")
    p.set_defaults(func=_lazy("studio.memory", "cli"))

    p = sub.add_parser("eval", help="held-out evaluation of a run (base vs tuned) as JSON")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="held-out file (default: the run's eval data)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows/pairs")
    p.set_defaults(func=_lazy("studio.evaluate", "cli"))

    p = sub.add_parser("export", help="export a run's adapter, a merged model, or a GGUF file")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["adapter", "merged", "gguf"], required=True)
    p.add_argument("--gguf-type", choices=["f16", "f32"], default="f16",
                   help="GGUF tensor type: f16 (half the size) or f32 (exact)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_lazy("studio.export", "cli"))

    p = sub.add_parser("votes", help="blind A/B votes from the Chat tab: wins, ties, losses, win rate and its 95%% "
                                    "interval per pair of models, as JSON")
    p.add_argument("--pair", default=None, metavar="X,Y",
                   help="only this pair, Y seen against X (a label, run name, adapter folder, or 'base')")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write every vote to this CSV file")
    p.set_defaults(func=_lazy("studio.votes", "cli"))

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _lazy(module: str, name: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set needs FIELD=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_train(args) -> int:
    from studio.config import ConfigError, RunConfig
    from studio.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = RunConfig.load(args.config)
        if args.set:
            cfg = cfg.updated(_parse_sets(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from studio.history import History

    # headless runs join the studio's run history (rank 0 only under accelerate launch)
    engine = Engine(on_event=History().record if rank == 0 else None)
    try:
        job = engine.start(cfg, resume_from=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar = _Progress(enabled=rank == 0)
    seen = 0
    try:
        while True:
            events = engine.events(seen)
            seen += len(events)
            for ev in events:
                bar.show(ev)
            if job.done and seen >= len(job.events):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping: saving a checkpoint and the adapter (Ctrl-C again to abort)…", file=sys.stderr)
        engine.stop()
        engine.wait()
        for ev in engine.events(seen):
            bar.show(ev)
    bar.close()
    engine.wait()  # let the training thread finish cleaning up before the interpreter exits
    _close_distributed()
    if job.state == "failed":
        print(f"error: {job.error}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"adapter: {job.adapter_path}")
        print(f"run folder: {job.run_dir} (run.yaml, metrics.jsonl, checkpoints)")
    return 0


def _close_distributed() -> None:
    """Under `accelerate launch`, leave the process group cleanly (NCCL warns about leaks otherwise)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def show(self, ev: dict) -> None:
        if not self.enabled:
            return
        t = ev["type"]
        if t in ("status", "error") and ev.get("message"):
            self._write(("error: " if t == "error" else "") + ev["message"])
        elif t in ("progress", "metrics") and ev.get("max_steps"):
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=ev["max_steps"], initial=ev.get("step", 0), unit="step", file=sys.stderr)
            self.bar.n = ev.get("step", 0)
            if t == "metrics" and "loss" in ev:
                post = {"loss": f"{ev['loss']:.4f}"}
                for k in ("rewards/margins", "kl"):
                    if k in ev:
                        post[k.split("/")[-1]] = f"{ev[k]:.3f}"
                if ev.get("tokens_per_s"):
                    post["tok/s"] = f"{ev['tokens_per_s']:.0f}"
                self.bar.set_postfix(post)
            self.bar.refresh()
        elif t == "done":
            self.close()
            self._write(ev.get("message", ""))

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


if __name__ == "__main__":
    sys.exit(main())
