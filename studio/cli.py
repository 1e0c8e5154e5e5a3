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
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (keeps its permissions)")
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
    p.set_defaults(func=_lazy("studio.training.memory", "cli"))

    p = sub.add_parser("eval", help="held-out evaluation of a run (base vs tuned) as JSON")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="held-out file (default: the run's eval data)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows/pairs")
    p.set_defaults(func=_lazy("studio.tuned.evaluate", "cli"))

    p = sub.add_parser("export", help="export a run's adapter, a merged model, or a GGUF file")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["adapter", "merged", "gguf"], required=True)
    p.add_argument("--gguf-type", choices=["f16", "f32"], default="f16",
                   help="GGUF tensor type: f16 (half the size) or f32 (exact)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same format at --out (only the files it wrote)")
    p.set_defaults(func=_lazy("studio.tuned.export", "cli"))

    p = sub.add_parser("votes", help="blind A/B votes from the Chat tab: wins, ties, losses, win rate and its 95%% "
                                    "interval per pair of models, as JSON")
    p.add_argument("--pair", default=None, metavar="X,Y",
                   help="only this pair, Y seen against X (a label, run name, adapter folder, or 'base')")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write every vote to this CSV file")
    p.set_defaults(func=_lazy("studio.tuned.votes", "cli"))

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _lazy(module: str, name: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _parse_sets(items: list[str]) -> dict:
    import yaml

    from studio.config.run import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set needs FIELD=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"--set {item}: '{v}' is not a value ({problem}); write numbers and words as they "
                              "are, lists as [1, 2], and quote text with brackets or colons: "
                              f"--set '{k.strip()}=\"{v}\"'") from None
    return out


def cmd_train(args) -> int:
    from studio.config.run import ConfigError, RunConfig
    from studio.training.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = RunConfig.load(args.config)
        if args.set:
            cfg = cfg.updated(_parse_sets(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from studio.runs.history import History, unused_run_config

    if args.resume is None and rank == 0:
        # a used name gets the next free one, as in the UI; a custom output folder is never renamed
        used = cfg
        try:
            cfg, note = unused_run_config(cfg)
        except ValueError as e:
            print(f"error: {e} (python -m studio train {args.config} --resume continues it; "
                  "--set output_dir=NEW_FOLDER starts afresh)", file=sys.stderr)
            return 2
        if note:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                print(f"error: run folder {used.run_dir()} already holds a run: add "
                      "--resume to continue it, or --set name=NEW_NAME", file=sys.stderr)
                return 2
            print(f"note: run name '{used.name}' is used (--resume continues that run); this run is "
                  f"'{cfg.name}' in {cfg.run_dir()}", file=sys.stderr)

    if rank == 0:  # the run plan before training (the engine decides with the same function, and stops on errors)
        from studio.training import plan as planner

        try:
            print(planner.plan_text(planner.plan_run(cfg)), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - no plan, no print: the engine reports the reason as the run's error
            pass
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
            bar.tick()
            time.sleep(0.5)
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
    """The engine's events on stderr: one tqdm bar per phase (data, conversion, reference pass, training, scoring,
    saving) with its own count and ETA, or an elapsed clock where the phase cannot count its work; ``tick`` keeps
    the clock moving between events."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.phase = None

    def show(self, ev: dict) -> None:
        if not self.enabled:
            return
        t = ev["type"]
        if t == "status" and ev.get("message"):  # a failure is printed once, as the last line ("error: …")
            self._write(ev["message"])
        elif t == "phase":
            self._phase(ev)
        elif t == "metrics" and self.bar is not None and self.phase == "training" and "loss" in ev:
            post = {"loss": f"{ev['loss']:.4f}"}
            for k in ("rewards/margins", "kl"):
                if k in ev:
                    post[k.split("/")[-1]] = f"{ev[k]:.3f}"
            if ev.get("tokens_per_s"):
                post["tok/s"] = f"{ev['tokens_per_s']:.0f}"
            self.bar.set_postfix(post)
        elif t == "done":
            self.close()
            if ev.get("state") != "failed":  # a failure is printed once, as the last line ("error: …")
                self._write(ev.get("message", ""))

    def _phase(self, ev: dict) -> None:
        from tqdm import tqdm

        from studio.training.engine import PHASE_LABELS

        name, total = ev.get("phase"), ev.get("total")
        if name != self.phase or self.bar is None or (total and self.bar.total != total):
            self.close()
            self.phase = name
            unit = "step" if name == "training" else ("pass" if name == "reference" else "it")
            desc = PHASE_LABELS.get(name, name) if name == "training" else ev.get("message") or name
            self.bar = tqdm(total=total or None, initial=ev.get("done") or 0, unit=unit, file=sys.stderr,
                            desc=desc, bar_format=None if total else "{desc} [{elapsed}]")
        if ev.get("done") is not None:
            self.bar.n = ev["done"]
        self.bar.refresh()

    def tick(self) -> None:
        """Redraw the current bar: its elapsed clock moves even when no event came."""
        if self.enabled and self.bar is not None:
            self.bar.refresh()

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.phase = None


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


if __name__ == "__main__":
    sys.exit(main())
