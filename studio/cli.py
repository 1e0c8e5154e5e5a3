"""Headless command line: ``python -m studio <command>``. Every command lives here; the work is done by the core.

- ``train RUN.yaml``   train with the same engine as the UI (also under ``accelerate launch -m studio train``)
- ``data FILE``        convert and clean a data file, print a JSON summary
- ``fit``              choose sequence length / batch that fit a GPU, print the memory estimate as JSON
- ``eval RUN_DIR``     held-out evaluation of a run, as JSON
- ``export RUN_DIR``   export the adapter, a merged model, a GGUF file or a GGUF LoRA adapter
- ``votes``            blind A/B votes: tallies and 95% intervals as JSON, the votes as CSV

Every command fails the same way: one line ``error: <what was wrong and what to do>`` on stderr, no traceback, and
the exit code of the error's kind (studio/errors.py): 2 when what was asked cannot be done as asked (a flag, field,
model or folder named wrongly), 1 when it was tried and failed (data, run, export, check, nothing fits).
``STUDIO_DEBUG=1`` prints the traceback of an unexpected error.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import logging
import os
import sys
import time

from studio.errors import StudioError, UsageError


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

    p = sub.add_parser("stop", help="stop a running run (started here, in the app or in another shell): its trainer "
                                   "saves a checkpoint and the adapter after the current step")
    p.add_argument("run", help="the run's name (a folder under the studio home's runs/) or its run folder")
    p.add_argument("--wait", action="store_true", help="wait until the run has stopped, then print its last line")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("data", help="convert and clean a data file; print a JSON summary "
                                   "(exit 1: the file can't be used; 2: a flag named wrongly)")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="where to write the cleaned JSONL (never the input file)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (keeps its permissions)")
    p.add_argument("--model", default=None, help="model id or path whose tokenizer measures lengths")
    p.add_argument("--max-length", type=int, default=None, help="token limit: longer rows are reported/dropped")
    p.add_argument("--map", action="append", default=[], metavar="THEIRS=OURS",
                   help="column mapping, e.g. --map question=prompt --map answer=completion --map rating=label")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="leave out JSONL lines that are not JSON objects (listed in the summary) instead of refusing")
    p.add_argument("--keep-duplicates", action="store_true", help="keep repeated rows and rows labelled both ways")
    p.add_argument("--keep-empty", action="store_true", help="keep rows whose completion is empty")
    p.add_argument("--drop-over-length", action="store_true",
                   help="drop rows longer than --max-length (else the trainer truncates them)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("fit", help="auto-fit sequence length and batch to a GPU; print the estimate as JSON")
    p.add_argument("--model", required=True, help="hub id, local folder, preset name or config.json")
    p.add_argument("--gpu-gib", type=float, required=True, help="GPU memory to fit in, GiB (e.g. 7.5 for 8 GB)")
    p.add_argument("--seq", type=int, default=None, help="fix the sequence length instead of searching")
    p.add_argument("--backend", choices=["unsloth", "bnb", "full"], default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-ceiling", type=int, default=None, help="longest max_length auto-fit may pick (default 4096)")
    p.add_argument("--effective-batch", type=int, default=16, help="rows per optimizer step, kept via gradient accumulation")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="held-out evaluation of a run (base vs tuned) as JSON")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="held-out file (default: the run's eval data)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows/pairs")
    p.set_defaults(func=cmd_eval)

    from studio.tuned.gguf_quant import DEFAULT_TYPE, DESCRIPTIONS, LLAMA_CPP_ENV, TYPES

    p = sub.add_parser(
        "export", help="export a run: its adapter, a merged model, a GGUF file, or a GGUF LoRA adapter",
        description=textwrap.fill(
            "Export a run and load the result back to check it (the result, with the checks, as JSON). adapter: the "
            "LoRA folder (PEFT). merged: the adapter merged into the base in float32, saved as safetensors in the "
            "base's dtype (bf16 for a 4-bit-stored base). gguf: the merged model as one file for llama.cpp / Ollama "
            "in --gguf-type, with a Modelfile. gguf-adapter: the LoRA alone as a llama.cpp GGUF adapter (tens of "
            "MB) with a Modelfile whose FROM is the base model. The size is printed before anything is written "
            "(--estimate prints only that).", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="GGUF types:\n" + "\n".join(f"  {t:7} {DESCRIPTIONS[t]}" for t in TYPES) + "\n\n"
               f"llama.cpp's tools (llama-quantize for q4_k_m, llama-completion to try the file) are looked for on "
               f"PATH and in ${LLAMA_CPP_ENV}.")
    p.add_argument("run_dir", help="run folder (its final adapter, else its newest checkpoint) or an adapter folder")
    p.add_argument("--format", choices=["adapter", "merged", "gguf", "gguf-adapter"], required=True)
    p.add_argument("--gguf-type", choices=list(TYPES), default=DEFAULT_TYPE,
                   help=f"tensor type of a gguf export (default {DEFAULT_TYPE}; see below)")
    p.add_argument("--out", required=False, default=None,
                   help="folder to write into (new, empty, or an earlier export of this format), or for gguf / "
                        "gguf-adapter a path ending in .gguf; required unless --estimate")
    p.add_argument("--base-gguf", default=None, metavar="PATH",
                   help="gguf-adapter: a GGUF of the base model for the Modelfile's FROM (default: the Ollama "
                        "library name of a preset model, else a placeholder the Modelfile explains)")
    p.add_argument("--estimate", action="store_true", help="print how big the export would be and write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same format at --out (only the files it wrote)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("votes", help="blind A/B votes from the Chat tab: wins, ties, losses, win rate and its 95%% "
                                    "interval per pair of models, as JSON")
    p.add_argument("--pair", default=None, metavar="X,Y",
                   help="only this pair, Y seen against X (a label, run name, adapter folder, or 'base')")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write every vote to this CSV file")
    p.set_defaults(func=cmd_votes)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StudioError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's doing: one line, and the way to see more
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())} (STUDIO_DEBUG=1 shows the "
              "traceback; please report it)", file=sys.stderr)
        return 1


def cmd_train(args) -> int:
    from studio.config.run import RunConfig, parse_sets
    from studio.training.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    cfg = RunConfig.load(args.config)
    if args.set:
        cfg = cfg.updated(parse_sets(args.set))
    from studio.runs import folder
    from studio.runs.history import History

    if args.resume is not None:  # the run's saved config, with what a resume may change (as in the UI)
        cfg, kept = folder.resume_run(cfg)
        if kept and rank == 0:
            print(f"note: resuming keeps the run's saved {', '.join(kept)} (the base model, the data and the "
                  "adapter's shape cannot change mid-run)", file=sys.stderr)
    elif rank == 0:
        # a used name gets the next free one, as in the UI; a custom output folder is never renamed
        used = cfg
        try:
            cfg, note = folder.new_run(cfg)
        except ValueError as e:
            raise UsageError(f"{e} (python -m studio train {args.config} --resume continues it; "
                             "--set output_dir=NEW_FOLDER starts afresh)") from None
        if note:
            from studio.training.plan import world_size

            if world_size() > 1:
                raise UsageError(f"run folder {used.run_dir()} already holds a run: add --resume to continue it, or "
                                 "--set name=NEW_NAME")
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
    job = engine.start(cfg, resume_from=args.resume)
    bar = _Progress(enabled=rank == 0)
    # the progress is the run folder's event log, as every viewer reads it (other ranks write none: their own)
    source = _FolderEvents(job.run_dir) if rank == 0 else _EngineEvents(engine)
    try:
        while True:
            ended = job.done and (job.thread is None or not job.thread.is_alive())  # its last event is written
            for ev in source.new():
                bar.show(ev)
            if ended:
                break
            bar.tick()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping: saving a checkpoint and the adapter (Ctrl-C again to abort)…", file=sys.stderr)
        engine.stop()
        engine.wait()
        for ev in source.new():
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


class _FolderEvents:
    """The new events of a run folder's event log, from this job's ``started`` event on."""

    def __init__(self, run_dir):
        from studio.runs import live

        self.view = live.RunView(run_dir)
        self.seen = 0

    def new(self) -> list[dict]:
        events = self.view.refresh().events
        if len(events) < self.seen:  # a new attempt began in the log
            self.seen = 0
        out, self.seen = events[self.seen:], len(events)
        return out


class _EngineEvents:
    def __init__(self, engine):
        self.engine, self.seen = engine, 0

    def new(self) -> list[dict]:
        out = self.engine.events(self.seen)
        self.seen += len(out)
        return out


def run_folder_of(run: str):
    """A run named on the command line: a run folder, or a run's name under the studio home's runs/."""
    from pathlib import Path

    from studio import paths
    from studio.runs import folder

    for candidate in (Path(run).expanduser(), paths.home() / "runs" / run):
        if candidate.is_dir() and (folder.is_run_folder(candidate) or folder.has_events(candidate)):
            return candidate.resolve()
    raise UsageError(f"no run '{run}': give a run folder, or the name of a run under {paths.home() / 'runs'} "
                     "(the Train tab's run history lists them)")


def cmd_stop(args) -> int:
    """``python -m studio stop RUN``: the run folder's stop request, which the run's trainer (this machine's app, a
    second app, a shell) turns into a checkpoint and the adapter after the current step."""
    from studio.runs import live

    run_dir = run_folder_of(args.run)
    view = live.RunView(run_dir)
    if not live.request_stop(run_dir, by=f"python -m studio stop (process {os.getpid()})"):
        state = view.state if view.has_log else "not running"
        raise UsageError(f"run '{run_dir.name}' is not training ({state}): nothing to stop")
    print(f"stop requested: {run_dir.name} saves a checkpoint and the adapter after the current step", file=sys.stderr)
    if not args.wait:
        return 0
    t0 = time.time()
    while not view.refresh().done:
        if args.timeout is not None and time.time() - t0 > args.timeout:
            print(f"still stopping after {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"{view.state}: {view.message}")
    return 0


def cmd_data(args) -> int:
    """``python -m studio data FILE --out CLEAN.jsonl``: the JSON summary on stdout."""
    from studio.data import clean
    from studio.data.normalize import ColumnError, DataError
    from studio.data.readers import BadLineError

    mapping = _usage(clean.parse_mapping, args.map)
    # filter flags are optional on the parser: the defaults are the Data tab's
    options = clean.CleanOptions(drop_duplicates=not getattr(args, "keep_duplicates", False),
                                 drop_empty=not getattr(args, "keep_empty", False),
                                 drop_over_length=getattr(args, "drop_over_length", False))
    bar = _LoadBar()
    try:
        summary = clean.run(args.file, args.out, model=args.model, max_length=args.max_length, mapping=mapping,
                            options=options, overwrite=getattr(args, "overwrite", False), progress=bar,
                            skip_bad_lines=getattr(args, "skip_bad_lines", False))
    except ColumnError as e:
        raise DataError(f"{e} {e.cli_hint()}.") from None
    except BadLineError as e:
        raise DataError(f"{e}. Add --skip-bad-lines to load the other lines (the skipped ones are listed in the "
                        "summary).") from None
    except StudioError:
        raise
    except Exception as e:  # never a traceback for a user's file; the type helps a bug report
        raise DataError(f"{args.file} could not be processed ({type(e).__name__}: {e})") from None
    finally:
        bar.close()
    print_json(summary)
    return 0


def cmd_fit(args) -> int:
    """``python -m studio fit --model ID_OR_PATH --gpu-gib 7.5 [--seq N] [--backend P] [--rank R]``: the chosen
    settings and the estimate breakdown per path, as JSON. Exit 0 when some path fits, 1 when none does."""
    from dataclasses import asdict

    from studio.models.arch import arch_for
    from studio.training import autofit, memory

    try:
        arch = arch_for(args.model)
    except (OSError, ValueError) as e:  # EstimateError is a UsageError already
        if isinstance(e, StudioError):
            raise
        raise UsageError(f"cannot read the architecture of {args.model}: {e}") from None
    seq_ceiling = getattr(args, "seq_ceiling", None) or memory.DEFAULT_SEQ_CEILING
    effective = getattr(args, "effective_batch", None) or 16
    base = memory.Settings(rank=args.rank)
    out = {"model": args.model, "arch": asdict(arch), "gpu_gib": args.gpu_gib, "paths": {}}
    for path in autofit.gpu_paths(args.backend):
        fit = autofit.auto_fit(arch, path, args.gpu_gib, seq=args.seq, seq_ceiling=seq_ceiling,
                              effective_batch=effective, settings=base)
        out["paths"][path] = fit.as_dict()
    ok_paths = [p for p, f in out["paths"].items() if f["ok"]]
    out["recommended_path"] = ok_paths[0] if ok_paths else None
    print_json(out)
    return 0 if ok_paths else 1


def cmd_eval(args) -> int:
    """``python -m studio eval RUN_DIR [--data FILE] [--limit N]``: the evaluation as JSON on stdout."""
    from pathlib import Path

    from studio import safepaths
    from studio.tuned import evaluate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()

    def show(msg: str, frac: float) -> None:
        print(f"[{frac:4.0%}] {msg}", file=sys.stderr, flush=True)

    try:
        result = evaluate.evaluate_run(args.run_dir, data=safepaths.typed(args.data), limit=args.limit,
                                       progress=show)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print_json({k: v for k, v in result.items() if k != "rows"})
    print(f"verdict: {evaluate.verdict_line(result)}", file=sys.stderr)
    print(f"per-row scores stored in {Path(result['run_dir']) / evaluate.EVAL_FILE}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """``python -m studio export RUN_DIR --format FORMAT --out PATH``: the result as JSON."""
    from studio.tuned import export

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    gguf_type = getattr(args, "gguf_type", None) or "q4_k_m"
    if getattr(args, "estimate", False):
        print_json(export.estimate(args.run_dir, args.format, gguf_type))
        return 0
    if not args.out:
        raise UsageError("--out is required: the folder (or, for gguf / gguf-adapter, a path ending in .gguf) to "
                         "write the export into")
    extra = {"overwrite": bool(getattr(args, "overwrite", False))}
    if args.format == "gguf":
        extra["gguf_type"] = gguf_type
    if args.format == "gguf-adapter" and getattr(args, "base_gguf", None):
        extra["base_gguf"] = args.base_gguf
    result = export.export(args.run_dir, args.format, args.out,
                           progress=lambda m: print(m, file=sys.stderr, flush=True), **extra)
    print_json(result.as_dict())
    return 0


def cmd_votes(args) -> int:
    """``python -m studio votes [--pair X,Y] [--csv FILE]``: tallies and intervals as JSON."""
    from studio.runs.history import History
    from studio.tuned import votes

    h = History()
    try:
        all_votes = h.votes()
    finally:
        h.close()
    found = [votes.find_pair(all_votes, args.pair)] if args.pair else votes.tallies(all_votes)
    out = {"history": str(h.path), "votes": len(all_votes), "pairs": [t.as_dict() for t in found]}
    if args.csv:
        out["csv"] = str(votes.export_csv(all_votes, args.csv))
    print_json(out)
    return 0


def _usage(fn, *a):
    """``fn(*a)``, with an error in what was typed turned into a usage error (exit 2)."""
    try:
        return fn(*a)
    except StudioError as e:
        raise UsageError(str(e)) from None


def _quiet_libraries() -> None:
    """No download/progress bars of datasets and transformers between the command's own lines."""
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


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

        from studio.training.events import PHASE_LABELS

        name, total = ev.get("phase"), ev.get("total")
        restarted = self.bar is not None and ev.get("done") is not None and ev["done"] < self.bar.n  # a new pass
        if name != self.phase or self.bar is None or (total and self.bar.total != total) or restarted:
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


class _LoadBar:
    """A progress bar on stderr for loading a file, shown only once loading has taken more than 2 seconds."""

    def __init__(self):
        self.bar = None

    def __call__(self, fraction: float, message: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=100, delay=2, file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                                                                            "{elapsed}")
        self.bar.set_description_str(message, refresh=False)
        self.bar.update(max(0, int(100 * fraction) - self.bar.n))  # shown after 2 s, then at most 10 times a second

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


if __name__ == "__main__":
    sys.exit(main())
