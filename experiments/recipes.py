"""Recipe experiments on real preference data: which settings make a LoRA adapter actually learn with KTO.

    python experiments/recipes.py prepare --data ../shared/data/hh-harmless-dev.jsonl.gz --work /tmp/rx
    python experiments/recipes.py run --work /tmp/rx --name lr2e-4 --set train.learning_rate=2e-4
    python experiments/recipes.py table --work /tmp/rx                # markdown table of every finished run

`prepare` splits the HH pairs 80/20 by pair with a fixed seed (the held-out pairs are never trained on) and writes
a 10%-desirable variant of the training rows with the studio's suggested weights. `run` trains the bundled model
with the studio engine (the same code path as the UI) starting from the 'standard' recipe preset plus overrides,
then evaluates base vs tuned on the held-out pairs with studio.evaluate: implicit-reward accuracy
(β·(log π − log π_ref), desirable vs undesirable per prompt) and mean margin. Results land in WORK/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _epochs(job, setting):
    """The epochs the run trained (a number): 'auto' as the run plan resolved it for the data."""
    plan = getattr(job, "plan", None)
    return plan.epochs if plan is not None and plan.epochs is not None else setting


def prepare(a) -> None:
    from studio.data import load_kto
    from studio.data.balance import suggest_weights
    from studio.data.readers import read_records

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = read_records(a.data)
    rnd = random.Random(a.seed)
    rnd.shuffle(pairs)
    n_eval = int(len(pairs) * a.eval_fraction)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    if a.train_pairs:
        train_pairs = train_pairs[: a.train_pairs]
    for name, rows in (("train_pairs.jsonl", train_pairs), ("eval_pairs.jsonl", eval_pairs)):
        with open(work / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # the imbalanced variant: every undesirable row, 10% of the desirable ones
    rows = load_kto(str(work / "train_pairs.jsonl"), seed=a.seed).rows
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]]
    keep = rnd.sample(good, max(1, len(good) // 10))
    imbalanced = keep + bad
    rnd.shuffle(imbalanced)
    with open(work / "train_10pct_desirable.jsonl", "w", encoding="utf-8") as f:
        for r in imbalanced:
            f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "label")}, ensure_ascii=False) + "\n")
    # the same rows with the desirable ones repeated instead of weighted (balancing by resampling, for comparison)
    copies = max(1, round(len(bad) / len(keep)))
    oversampled = keep * copies + bad
    rnd.shuffle(oversampled)
    with open(work / "train_10pct_oversampled.jsonl", "w", encoding="utf-8") as f:
        for r in oversampled:
            f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "label")}, ensure_ascii=False) + "\n")
    w = suggest_weights(len(keep), len(bad))
    meta = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "train_rows": len(rows),
            "imbalanced": {"desirable": len(keep), "undesirable": len(bad), "desirable_weight": w.desirable_weight,
                           "undesirable_weight": w.undesirable_weight, "note": w.note}}
    (work / "split.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


def run(a) -> None:

    from studio.tuned import evaluate
    from studio.config import presets
    from studio.training import plan
    from studio.config.run import RunConfig, parse_sets
    from studio.training.engine import Engine

    work = Path(a.work)
    meta = json.loads((work / "split.json").read_text())
    cfg = plan.apply_recipe(RunConfig(), presets.get("recipes", a.recipe))
    changes = {
        "name": a.name, "output_dir": str(work / "runs" / a.name),
        "data.train_file": str(work / "train_pairs.jsonl"), "data.eval_file": None, "data.eval_fraction": 0.0,
        "train.save_steps": 100_000, "train.logging_steps": 5,
    }
    if a.imbalanced and a.oversample:
        changes["data.train_file"] = str(work / "train_10pct_oversampled.jsonl")
    elif a.imbalanced:
        imb = meta["imbalanced"]
        wd, wu = imb["desirable_weight"], imb["undesirable_weight"]
        if a.weights == "normalized":  # same ratio, mean row weight 1: the loss keeps the balanced run's scale
            scale = (imb["desirable"] + imb["undesirable"]) / (wd * imb["desirable"] + wu * imb["undesirable"])
            wd, wu = round(wd * scale, 4), round(wu * scale, 4)
        changes["data.train_file"] = str(work / "train_10pct_desirable.jsonl")
        changes["kto.desirable_weight"] = wd
        changes["kto.undesirable_weight"] = wu
    cfg = cfg.updated({**changes, **parse_sets(a.set)})
    t0 = time.time()
    engine = Engine()
    job = engine.start(cfg)
    engine.wait()
    train_s = time.time() - t0
    out = {"name": a.name, "recipe": a.recipe, "imbalanced": a.imbalanced, "weights_mode": a.weights,
           "oversample": a.oversample, "sets": a.set, "state": job.state,
           "error": job.error, "backend": job.backend, "train_s": round(train_s, 1),
           "config": {"lr": cfg.train.learning_rate, "beta": cfg.kto.beta, "r": cfg.lora.r,
                      "alpha": cfg.lora.lora_alpha, "epochs": _epochs(job, cfg.train.num_train_epochs),
                      "batch": cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps,
                      "max_length": cfg.kto.max_length, "scheduler": cfg.train.lr_scheduler_type,
                      "warmup": cfg.train.warmup_steps,
                      "weights": [cfg.kto.desirable_weight, cfg.kto.undesirable_weight]}}
    if job.state == "finished":
        t1 = time.time()
        ev = evaluate.evaluate_run(cfg.run_dir(), data=str(work / "eval_pairs.jsonl"), limit=a.limit)
        out.update(eval_s=round(time.time() - t1, 1), n_pairs=ev["n_pairs"],
                   reward_accuracy=ev["rewards"]["pair_accuracy"], margin=ev["rewards"]["margin"],
                   pair_margin=ev["rewards"]["pair_margin"], base_likelihood_accuracy=ev["base"]["pair_accuracy"],
                   tuned_likelihood_accuracy=ev["tuned"]["pair_accuracy"],
                   logp_per_token_desirable_base=ev["base"]["logp_per_token_desirable"],
                   logp_per_token_desirable_tuned=ev["tuned"]["logp_per_token_desirable"])
        out["drift"] = out["logp_per_token_desirable_tuned"] - out["logp_per_token_desirable_base"]
    out["wall_s"] = round(time.time() - t0, 1)
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{a.name}.json").write_text(json.dumps(out, indent=2))
    print("RESULT " + json.dumps(out), flush=True)


def table(a) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(a.work, "results").glob("*.json"))]
    print("| run | lr | β | r/α | epochs | batch | weights | held-out reward acc. | mean margin | base→tuned "
          "likelihood acc. | train+eval wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        if r.get("reward_accuracy") is None:
            print(f"| {r['name']} | {c['lr']:g} | {c['beta']} | – | – | – | – | failed: {r.get('error')} | | | |")
            continue
        print(f"| {r['name']} | {c['lr']:g} | {c['beta']} | {c['r']}/{c['alpha']} | {c['epochs']:g} | {c['batch']} | "
              f"{c['weights'][0]:g}/{c['weights'][1]:g} | {100 * r['reward_accuracy']:.1f}% | {r['margin']:+.4f} | "
              f"{100 * r['base_likelihood_accuracy']:.1f}% → {100 * r['tuned_likelihood_accuracy']:.1f}% | "
              f"{r['wall_s']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--train-pairs", type=int, default=None, help="use only this many training pairs (CPU runs)")
    p.set_defaults(func=prepare)
    p = sub.add_parser("run")
    p.add_argument("--work", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--recipe", default="standard")
    p.add_argument("--imbalanced", action="store_true")
    p.add_argument("--weights", choices=["auto", "normalized"], default="auto",
                   help="imbalanced runs: the studio's suggested weights, or the same ratio scaled to mean weight 1")
    p.add_argument("--oversample", action="store_true",
                   help="imbalanced runs: repeat the desirable rows instead of weighting them")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many held-out rows")
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(func=run)
    p = sub.add_parser("table")
    p.add_argument("--work", required=True)
    p.set_defaults(func=table)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a.func(a)


if __name__ == "__main__":
    main()
