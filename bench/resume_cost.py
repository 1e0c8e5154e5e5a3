"""What a resume costs: the bundled model trains 6 steps on CPU with the held-out watch on, is stopped at step 3 (a
stop request, as the Stop button writes), and is resumed; issue 30's bar is that the resume takes at most its 3
remaining steps plus 20 s. Prints figures and PASS/FAIL; asserts nothing.

    python bench/resume_cost.py [--data sample|FILE] [--steps 6] [--stop-at 3] [--slack 20] [--dtype float32]
                                [--work DIR]

The run config is the CPU card's plan of the default config (studio.training.plan, as the Model tab plans a first
run: max_length from the data, 2 x 4 rows a step, at most 48 held-out rows watched), with max_steps set to --steps.
Printed for the resume: each resumed step's time, the time from the resume's start to its first new step, the
total (start to the saved adapter), where the time before the first step went (the engine's phases: data, model,
reference, scoring, ...), the limit and PASS/FAIL; for the first run the same phases, to compare. Other work on the
machine slows every figure down (the load average is printed); a failure says why it stopped (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def step_timer(stop_at: int | None, run_dir: Path):
    """A trainer callback timing each optimizer step; with ``stop_at``, it writes the run folder's stop request
    during that step (the engine sees it at the step's end, as it sees the Stop button's)."""
    from transformers import TrainerCallback

    from studio.runs import folder

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}

        def on_step_begin(self, args, state, control, **kw):
            step = state.global_step + 1
            self.begin[step] = time.time()
            if stop_at is not None and step == stop_at:
                folder.request_stop(run_dir, by="bench/resume_cost.py")

        def on_step_end(self, args, state, control, **kw):
            self.end[state.global_step] = time.time()

    return StepTimer()


def phases(events: list[dict], t0: float, until: float | None) -> list[tuple[str, float]]:
    """(phase name, seconds) in order, from the engine's phase events up to ``until``; a phase lasts until the
    next phase event (repeats of one phase are merged)."""
    marks = [(e["phase"], e["time"]) for e in events if e.get("type") == "phase"]
    out: list[list] = [["start", 0.0]]
    last = t0
    for name, t in marks:
        if until is not None and t > until:
            break
        out[-1][1] += t - last
        last = t
        if out[-1][0] != name:
            out.append([name, 0.0])
    if until is not None:
        out[-1][1] += max(0.0, until - last)
    return [(n, round(s, 1)) for n, s in out if s >= 0.05]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stop-at", type=int, default=3)
    ap.add_argument("--slack", type=float, default=20.0, help="seconds the resume may take beyond its steps")
    ap.add_argument("--dtype", default=None, help="model.dtype, e.g. float32 (a CPU without bf16; default: the plan's)")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kto-resume-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KTO_STUDIO_HOME", str(work / "home"))

    from studio.config.run import RunConfig
    from studio.models import bundled
    from studio.models.load import detect_device
    from studio.training import plan
    from studio.training.engine import Engine

    def fail(why: str) -> int:
        print(f"FAIL: {why}", flush=True)
        return 1

    print(f"machine: {os.cpu_count()} cores, load {load()}; work folder {work}", flush=True)
    bundled.ensure_checkpoint()  # a fresh clone converts the bundled model once; not a resume's cost
    cfg = RunConfig().updated({"name": "resume-cost", "output_dir": str(work / "run"), "data.train_file": a.data})
    cfg = plan.plan(cfg, "cpu", detect_device(), recipe_key="standard").config
    cfg = cfg.updated({"train.max_steps": a.steps, **({"model.dtype": a.dtype} if a.dtype else {})})
    t = cfg.train
    print("config:", json.dumps({"max_length": cfg.kto.max_length, "batch": t.per_device_train_batch_size,
                                 "accumulation": t.gradient_accumulation_steps, "max_steps": t.max_steps,
                                 "eval_max_rows": cfg.data.eval_max_rows, "watch_every": cfg.watch.every_steps,
                                 "dtype": cfg.model.dtype}), flush=True)
    run_dir = cfg.run_dir()

    engine = Engine()
    first = step_timer(a.stop_at, run_dir)
    engine.extra_callbacks = [first]
    t0 = time.time()
    job = engine.start(cfg)
    engine.wait()
    t1 = time.time()
    if job.state != "stopped":
        return fail(f"the first run should have stopped at step {a.stop_at}; it ended {job.state}"
                    + (f": {job.error}" if job.error else ""))
    stopped = job.events[-1].get("step")
    if stopped != a.stop_at:
        return fail(f"the first run stopped at step {stopped}, not {a.stop_at}")
    first_step = min(first.begin.values())
    print(f"first run: {t1 - t0:.1f} s to step {stopped}; before step 1: {first_step - t0:.1f} s "
          f"{phases(job.events, t0, first_step)}", flush=True)

    resumed = step_timer(None, run_dir)
    engine.extra_callbacks = [resumed]
    t2 = time.time()
    job2 = engine.start(cfg, resume_from="latest")
    engine.wait()
    t3 = time.time()
    if job2.state != "finished":
        return fail(f"the resume ended {job2.state}" + (f": {job2.error}" if job2.error else ""))
    new = sorted(s for s in resumed.end if s in resumed.begin)
    want = list(range(a.stop_at + 1, a.steps + 1))
    if new != want:
        return fail(f"the resume trained steps {new}, not {want}")
    step_s = {s: resumed.end[s] - resumed.begin[s] for s in new}
    steps_total = sum(step_s.values())
    to_first = resumed.begin[new[0]] - t2
    total = t3 - t2
    limit = steps_total + a.slack
    after = t3 - resumed.end[new[-1]]
    print(f"resume: steps {', '.join(f'{s}: {v:.1f} s' for s, v in step_s.items())} = {steps_total:.1f} s",
          flush=True)
    print(f"resume: start to first new step {to_first:.1f} s {phases(job2.events, t2, resumed.begin[new[0]])}")
    print(f"resume: after the last step {after:.1f} s (final held-out check, adapter, health)")
    print(f"resume: total {total:.1f} s; limit {a.steps - a.stop_at} steps + {a.slack:g} s = {limit:.1f} s; "
          f"load {load()}")
    if total > limit:
        return fail(f"the resume took {total:.1f} s, {total - limit:.1f} s over the limit: {to_first:.1f} s before "
                    f"its first step and {after:.1f} s after its last")
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
