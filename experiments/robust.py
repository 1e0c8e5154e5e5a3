"""Robustness of a training config over seeds: the studio's engine, a fixed held-out split, one JSON line per run.

    python experiments/robust.py --work /tmp/rb --seeds 42 7 1 2 3                       # the default config
    python experiments/robust.py --work /tmp/rb --seeds 42 7 1 2 3 --variant desirable10 # 10% desirable + weights
    python experiments/robust.py --work /tmp/rb --seeds 42 7 1 2 3 --parallel 5 --set train.learning_rate=5e-4
    python experiments/robust.py --work /tmp/rb --seeds 1 2 --limit 48 --eval-rows 16 \\
        --set train.max_steps=3 --set kto.max_length=64 --set train.gradient_checkpointing=false   # CPU, tiny

The preference pairs (default ../shared/data/hh-harmless-dev.jsonl.gz) are converted to KTO rows and split by
prompt group with a fixed seed (--split-seed, independent of the training seeds): --eval-rows held-out rows (512,
whole pairs) are never trained on. Every run starts from the studio's default RunConfig (or --recipe / --gpu-preset
as the UI applies them) plus --set overrides and trains with the studio's engine (the UI's code path: held-out watch,
best step, collapse guard as configured). With --watch split (the default, as a user gets it) the watch runs on the
run's own data.eval_fraction split of its training file, and the adapter the run kept is then scored on the
--eval-rows held-out rows, which neither training nor the choice of the best step saw. The desirable10 variant keeps
10% of the desirable training rows (fixed seed) and every undesirable one, with the studio's suggested weights
(studio.data.balance.suggest_weights).

Each run prints one line ``{"seed", "variant", "settings", "accuracy", "accuracy_se", "n_pairs", "margin",
"logp_per_token_desirable": {"base", "tuned"}, "drift", "collapsed", "best_step", "kept_step", "last": {...}, ...,
"wall_s"}``; the last line is ``{"summary": {...}}`` with the mean, the spread (standard deviation, min, max) and the
worst seed. ``last`` holds the watch's numbers at the last step (on the watch's rows). --parallel N runs N seeds at
once as separate processes (one GPU is enough for the bundled model).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = str(ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz")


def _epochs(job, setting):
    """The epochs the run trained (a number): 'auto' as the run plan resolved it for the data."""
    plan = getattr(job, "plan", None)
    return plan.epochs if plan is not None and plan.epochs is not None else setting


# ---- the fixed split -------------------------------------------------------------------------------------------

def prepare(work: Path, data: str, eval_rows: int, split_seed: int, limit: int | None) -> dict:
    """Write train.jsonl, heldout.jsonl and train_desirable10.jsonl under WORK/split (once; reused after)."""
    from studio.data import load_kto
    from studio.data.balance import suggest_weights
    from studio.data.clean import prompt_key

    split = work / "split"
    meta_file = split / "split.json"
    wanted = {"data": str(data), "eval_rows": eval_rows, "split_seed": split_seed, "limit": limit}
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("wanted") == wanted:
            return meta
    split.mkdir(parents=True, exist_ok=True)
    rows = [{k: r[k] for k in ("prompt", "completion", "label")} for r in load_kto(data).rows]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(prompt_key(r["prompt"]), []).append(r)
    order = list(groups.values())
    random.Random(split_seed).shuffle(order)
    held, train = [], []
    for g in order:
        if len(held) + len(g) <= eval_rows and len(held) < eval_rows:
            held.extend(g)
        else:
            train.extend(g)
    random.Random(split_seed).shuffle(train)
    if limit:
        train = train[:limit]
    rnd = random.Random(split_seed + 1)
    good = [r for r in train if r["label"]]
    bad = [r for r in train if not r["label"]]
    keep = rnd.sample(good, max(1, len(good) // 10))
    imbalanced = keep + bad
    rnd.shuffle(imbalanced)
    for name, part in (("train.jsonl", train), ("heldout.jsonl", held), ("train_desirable10.jsonl", imbalanced)):
        with open(split / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    w = suggest_weights(len(keep), len(bad))
    meta = {"wanted": wanted, "train_rows": len(train), "heldout_rows": len(held),
            "heldout_pairs": sum(1 for g in order if g[0] in held and len({r["label"] for r in g}) == 2),
            "desirable10": {"desirable": len(keep), "undesirable": len(bad), "desirable_weight": w.desirable_weight,
                            "undesirable_weight": w.undesirable_weight}}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


# ---- one run ---------------------------------------------------------------------------------------------------

def run_one(a) -> dict:

    from studio.tuned import evaluate
    from studio.config import presets
    from studio.training import plan
    from studio.config.run import RunConfig, parse_sets
    from studio.training.engine import Engine

    work = Path(a.work)
    meta = json.loads((work / "split" / "split.json").read_text())
    cfg = RunConfig()
    if a.gpu_preset:
        cfg = presets.apply(cfg, presets.get("gpu", a.gpu_preset))
    if a.recipe:
        cfg = plan.apply_recipe(cfg, presets.get("recipes", a.recipe))
    name = f"{a.variant}-s{a.seed}" + (f"-{a.tag}" if a.tag else "")
    heldout = str(work / "split" / "heldout.jsonl")
    changes = {"name": name, "output_dir": str(work / "runs" / name), "train.seed": a.seed,
               "data.train_file": str(work / "split" / "train.jsonl"), "train.save_steps": 100_000}
    if a.watch == "heldout":  # the watch scores (and picks the best step on) the reported rows themselves
        changes.update({"data.eval_file": heldout, "data.eval_max_rows": max(meta["heldout_rows"], 2)})
    if a.variant == "desirable10":
        d = meta["desirable10"]
        changes.update({"data.train_file": str(work / "split" / "train_desirable10.jsonl"),
                        "kto.desirable_weight": d["desirable_weight"],
                        "kto.undesirable_weight": d["undesirable_weight"]})
    cfg = cfg.updated({**changes, **parse_sets(a.set)})
    trace = _trace(heldout, work / "traces" / f"{name}.jsonl") if a.trace else None
    t0 = time.time()
    engine = Engine()
    job = engine.start(cfg)
    engine.wait()
    t = cfg.train
    out = {"seed": a.seed, "variant": a.variant, "tag": a.tag, "state": job.state, "error": job.error,
           "backend": job.backend,
           "settings": {"lr": t.learning_rate, "batch": t.per_device_train_batch_size,
                        "grad_accum": t.gradient_accumulation_steps, "beta": cfg.kto.beta,
                        "warmup": t.warmup_steps, "max_length": cfg.kto.max_length,
                        "epochs": _epochs(job, t.num_train_epochs),
                        "max_steps": t.max_steps, "scheduler": t.lr_scheduler_type, "lora_r": cfg.lora.r,
                        "weights": [cfg.kto.desirable_weight, cfg.kto.undesirable_weight],
                        "watch": cfg.watch.model_dump(), "recipe": a.recipe, "gpu_preset": a.gpu_preset,
                        "sets": a.set}}
    ev = evaluate.read_eval(cfg.run_dir()) if job.state == "finished" else None
    w = (ev or {}).get("watch") or {}
    if ev is not None and a.watch == "split":  # the kept adapter, scored on rows the run never saw
        ev = evaluate.evaluate_run(cfg.run_dir(), data=heldout, save=False)
    if ev is not None:
        r = ev["rewards"]
        points = w.get("points") or []
        last = points[-1] if points else {}
        out.update(
            accuracy=r.get("pair_accuracy"), accuracy_se=r.get("pair_accuracy_se"), n_pairs=ev["n_pairs"],
            margin=r.get("margin"),
            logp_per_token_desirable={"base": ev["base"].get("logp_per_token_desirable"),
                                      "tuned": ev["tuned"].get("logp_per_token_desirable")},
            drift=ev.get("drift"), verdict=ev["verdict"]["word"],
            collapsed=ev.get("drift") is None or ev["drift"] < -0.5,  # the kept adapter: the bound
            guard_fired=bool(w.get("collapsed")), rolled_back=bool(w.get("rolled_back")),
            best_step=w.get("best_step"), kept_step=w.get("kept_step"), last_step=w.get("last_step"),
            min_drift=min((p["heldout/drift"] for p in points if p.get("heldout/drift") is not None), default=None),
            last={"accuracy": last.get("heldout/accuracy"), "accuracy_se": last.get("heldout/accuracy_se"),
                  "margin": last.get("heldout/margin"), "drift": last.get("heldout/drift")})
    if trace is not None:
        out["trace"] = trace
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def _trace(heldout: str, log: Path) -> list[dict]:
    """--trace: at every held-out check of the watch, also score the --eval-rows rows (which the run never saw)
    and record both, with the watch's per-row rewards, so that rules for the kept step can be compared offline
    against the accuracy each check's adapter really has. Costs one extra scoring pass per check. Each entry is also
    appended to ``log`` as it is taken (a sweep cut short keeps what it measured)."""
    from studio.tuned import evaluate, scoring
    from studio.training import watch as watch_mod

    rows = [json.loads(line) for line in Path(heldout).read_text(encoding="utf-8").splitlines() if line.strip()]
    trace: list[dict] = []
    shadow: dict = {}
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    begin, check = watch_mod.Watch.begin, watch_mod.Watch.check

    def traced_begin(self, model, tokenizer, step, max_steps, rows_per_step):
        begin(self, model, tokenizer, step, max_steps, rows_per_step)
        s = watch_mod.Watch(self.cfg.updated({"data.eval_max_rows": len(rows) + 2}), rows, lambda *a, **k: None)
        s.tokenizer = tokenizer
        s.items, s.kept, s.skipped = scoring.tokenize_rows(tokenizer, s.rows, self.cfg.kto.max_length)
        with model.disable_adapter():
            s.base = s._logps(model, "base model")
        shadow["w"] = s

    def traced_check(self, model, step, guard=True):
        point = check(self, model, step, guard)
        s = shadow.get("w")
        if s is not None and point.result is not None:
            r = evaluate.score_result(s.rows, s.items, s.kept, s.skipped, s.base, s._logps(model, "tuned"),
                                      beta=self.cfg.kto.beta, max_length=self.cfg.kto.max_length)
            trace.append({"step": step, "beta": self.cfg.kto.beta, "kept_now": self.best is point,
                          "collapse_seen": self.collapse is not None,
                          "watch": {**point.metrics(), "rows": [
                              {"label": x["label"], "reward": x["reward"], "n_tokens": x["n_tokens"],
                               "prompt": hashlib.sha1(evaluate._prompt_key(
                                   self.rows[x["index"]]["prompt"]).encode()).hexdigest()[:10]}
                              for x in point.result["rows"]]},
                          "heldout": {"accuracy": r["rewards"]["pair_accuracy"], "margin": r["rewards"]["margin"],
                                      "drift": r["drift"], "n_pairs": r["n_pairs"]}})
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(trace[-1]) + "\n")
        return point

    watch_mod.Watch.begin, watch_mod.Watch.check = traced_begin, traced_check
    return trace


# ---- many runs -------------------------------------------------------------------------------------------------

def summary(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("accuracy") is not None]

    def stats(key, rows):
        xs = [r[key] for r in rows if r.get(key) is not None]
        if not xs:
            return None
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return {"mean": m, "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs)}

    worst = min(ok, key=lambda r: r["accuracy"]) if ok else None
    last = [{"accuracy": (r.get("last") or {}).get("accuracy")} for r in ok]
    return {"runs": len(results), "finished": len(ok), "failed": [r["seed"] for r in results if r not in ok],
            "accuracy": stats("accuracy", ok), "last_step_accuracy": stats("accuracy", last),
            "margin": stats("margin", ok), "drift": stats("drift", ok),
            "collapses": sum(1 for r in ok if r.get("collapsed")),
            "guard_fired": sum(1 for r in ok if r.get("guard_fired")),
            "worst_seed": None if worst is None else {"seed": worst["seed"], "accuracy": worst["accuracy"],
                                                     "accuracy_se": worst.get("accuracy_se"),
                                                     "drift": worst.get("drift")},
            "wall_s": stats("wall_s", results)}


def report(work: Path) -> str:
    """A markdown table of every run in WORK/results.jsonl, one row per settings tag and variant."""
    groups: dict[tuple[str, str], list[dict]] = {}
    if not (work / "results.jsonl").is_file():
        return f"No run has finished in {work} (results.jsonl is absent)."
    for line in (work / "results.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            groups.setdefault((r.get("tag") or "default", r["variant"]), []).append(r)
    out = ["| settings | data | runs | held-out reward acc., mean ± sd | worst seed | each seed (acc. / drift) | "
           "collapsed (kept adapter's drift < −0.5) | guard fired |", "|---|---|---|---|---|---|---|---|"]
    for (tag, variant), rows in sorted(groups.items()):
        s = summary(rows)
        acc, worst = s["accuracy"], s["worst_seed"]
        each = " · ".join(
            f"s{r['seed']} {100 * r['accuracy']:.1f}% / {r['drift']:+.2f}" if r.get("accuracy") is not None
            else f"s{r['seed']} {r.get('state')}" for r in sorted(rows, key=lambda r: r["seed"]))
        out.append(
            f"| {tag} | {variant} | {s['finished']} of {s['runs']} | "
            + (f"{100 * acc['mean']:.1f}% ± {100 * acc['sd']:.1f}" if acc else "–") + " | "
            + (f"{100 * worst['accuracy']:.1f}% (seed {worst['seed']})" if worst else "–")
            + f" | {each} | {s['collapses']} | {s['guard_fired']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the split, the runs and results.jsonl")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1, 2, 3])
    ap.add_argument("--variant", choices=["full", "desirable10"], default="full")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="as `python -m studio train`")
    ap.add_argument("--recipe", default=None, help="start from a recipe preset (e.g. standard)")
    ap.add_argument("--gpu-preset", default=None, help="start from a GPU preset (e.g. 8gb, cpu)")
    ap.add_argument("--tag", default="", help="added to run names, to keep several settings in one --work")
    ap.add_argument("--parallel", type=int, default=1, help="seeds trained at once, as separate processes")
    ap.add_argument("--limit", type=int, default=None, help="train on at most this many rows (CPU tries)")
    ap.add_argument("--eval-rows", type=int, default=512, help="held-out rows, whole pairs, never trained on")
    ap.add_argument("--watch", choices=["split", "heldout"], default="split",
                    help="split (default, as a user gets it): the held-out watch uses the run's own data.eval_fraction "
                         "split of its training file, and the kept adapter is then scored on the --eval-rows rows it "
                         "never saw; heldout: the watch scores the reported rows themselves (optimistic)")
    ap.add_argument("--trace", action="store_true",
                    help="also score the --eval-rows rows at every held-out check (see _trace; an experiment)")
    ap.add_argument("--split-seed", type=int, default=0, help="the split's seed (independent of --seeds)")
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # one run, in a child process
    ap.add_argument("--report", action="store_true", help="print the table of WORK/results.jsonl and stop")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work)
    if a.report:
        print(report(work))
        return
    if a.seed is not None:
        import logging

        import torch

        logging.basicConfig(level=logging.ERROR)
        if not torch.cuda.is_available() and a.parallel > 1:  # CPU: share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.parallel))
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return
    meta = prepare(work, a.data, a.eval_rows, a.split_seed, a.limit)
    print(json.dumps({"split": {k: v for k, v in meta.items() if k != "wanted"}}), flush=True)
    child = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--variant", a.variant,
             "--data", a.data, "--eval-rows", str(a.eval_rows), "--split-seed", str(a.split_seed),
             "--parallel", str(a.parallel), "--watch", a.watch] + (["--trace"] if a.trace else [])
    for s in a.set:
        child += ["--set", s]
    for flag, v in (("--recipe", a.recipe), ("--gpu-preset", a.gpu_preset), ("--tag", a.tag)):
        if v:
            child += [flag, v]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, results = list(a.seeds), [], []
    while pending or running:
        while pending and len(running) < max(1, a.parallel):
            seed = pending.pop(0)
            log = open(work / "logs" / f"{a.variant}-s{seed}{'-' + a.tag if a.tag else ''}.log", "w")
            # output into a file, not a pipe: a long run's log would fill a pipe nobody reads until the end
            proc = subprocess.Popen(child + ["--seed", str(seed)], stdout=log, stderr=subprocess.STDOUT, text=True)
            running.append((seed, proc, log))
        for item in list(running):
            seed, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            text = Path(log.name).read_text(encoding="utf-8", errors="replace")
            lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"seed": seed, "variant": a.variant, "state": "crashed",
                                                          "error": f"exit {proc.returncode}: see {log.name}"}
            results.append(r)
            print(json.dumps(r), flush=True)
            with open(work / "results.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")
        time.sleep(1)
    print(json.dumps({"summary": {"variant": a.variant, "sets": a.set, "recipe": a.recipe,
                                  "gpu_preset": a.gpu_preset, **summary(results)}}), flush=True)


if __name__ == "__main__":
    main()
