"""Held-out evaluation of a run: how the tuned model scores desirable vs undesirable completions, against the base.

For every held-out KTO row the completion's log-probability given the prompt is computed twice, with the adapter
off (the base model, which is TRL's reference model for a LoRA run) and on (the tuned model). The rows are tokenized
the way TRL's ``KTOTrainer`` tokenizes them (chat template for conversational rows, EOS appended to plain-text
completions, the completion starting where the tokenized prompt and prompt+completion diverge, ``max_length``
truncation), and the log-prob is the sum over completion tokens computed in float32, so the implicit rewards
``beta * (log pi_tuned - log pi_base)`` are the ones the training curves show.

Reported, for base and tuned: mean log-prob of desirable and undesirable completions and their gap (unpaired data
works); the fraction of paired prompts (a prompt with a desirable and an undesirable completion, as TRL's
``unpair_preference_dataset`` produces) where the desirable completion has the higher log-prob. For the tuned model:
mean implicit rewards, the margin, and the implicit-reward accuracy over pairs. A prompt with several completions of
each label counts once, averaged over its desirable x undesirable combinations.

``python -m studio eval RUN_DIR`` prints the result as JSON; every evaluation is stored as ``eval.json`` in the run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from studio import atomic
from studio.models import cpu_threads
from studio.runs import folder
from studio.runs.folder import EVAL_FILE  # noqa: F401 - evaluate.EVAL_FILE for its readers
from studio.tuned.scoring import (EvalError, Tokenized, completion_logps, pad_id, tokenize_row,  # noqa: F401
                                  tokenize_rows)

Progress = Callable[[str, float], None] | None  # (message, fraction done)

# ---- the evaluation --------------------------------------------------------------------------------------------

def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def limit_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` rows, taking whole prompts in order so that pairs stay together."""
    if not limit or limit >= len(rows):
        return list(rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_prompt_key(r["prompt"]), []).append(r)
    out: list[dict] = []
    for g in groups.values():
        if out and len(out) + len(g) > limit:
            break
        out.extend(g[: max(limit - len(out), 1)])
        if len(out) >= limit:
            break
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _side_stats(rows: list[dict], key: str) -> dict[str, Any]:
    good = [r[key] for r in rows if r["label"]]
    bad = [r[key] for r in rows if not r["label"]]
    good_tok = [r[key] / r["n_tokens"] for r in rows if r["label"] and r["n_tokens"]]
    bad_tok = [r[key] / r["n_tokens"] for r in rows if not r["label"] and r["n_tokens"]]
    mg, mb = _mean(good), _mean(bad)
    return {
        "logp_desirable": mg,
        "logp_undesirable": mb,
        "logp_gap": mg - mb if mg is not None and mb is not None else None,
        "logp_per_token_desirable": _mean(good_tok),
        "logp_per_token_undesirable": _mean(bad_tok),
    }


def _paired(rows: list[dict]) -> dict[str, tuple[list[dict], list[dict]]]:
    """The prompts (by ``_prompt``) with both labels: prompt -> (desirable rows, undesirable rows)."""
    groups: dict[str, tuple[list[dict], list[dict]]] = {}
    for r in rows:
        g = groups.setdefault(r["_prompt"], ([], []))
        g[0 if r["label"] else 1].append(r)
    return {k: g for k, g in groups.items() if g[0] and g[1]}


def _win(good: list[dict], bad: list[dict], key: str) -> tuple[float, float]:
    """(share of the prompt's desirable x undesirable combinations where desirable is higher on ``key``, mean
    difference). A tie (an unchanged model gives every reward 0) is half a win, not a loss."""
    combos = [(g[key], b[key]) for g in good for b in bad]
    return (sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in combos) / len(combos),
            sum(g - b for g, b in combos) / len(combos))


def accuracy_se(accuracy: float | None, n: int) -> float | None:
    """One standard error of an accuracy over ``n`` prompts: sqrt(p(1-p)/n), with p pulled towards 50% by one win
    and one loss ((wins+1)/(n+2)) so that 5 of 5 does not read as a certain 100% ± 0."""
    if accuracy is None or not n:
        return None
    p = (accuracy * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / n)


def format_accuracy(accuracy: float | None, se: float | None, n: int | None, unit: str = "pairs") -> str:
    """'62% ± 4.8 (100 pairs)': every accuracy the studio reports comes with its count and one standard error."""
    if accuracy is None or not n:
        return f"– (no {unit})"
    spread = f" ± {100 * se:.1f}" if se is not None else ""
    return f"{100 * accuracy:.0f}%{spread} ({n} {unit if n != 1 else unit.rstrip('s')})"


def _pair_score(pairs, key: str) -> tuple[float | None, float | None]:
    """(fraction of prompts where desirable beats undesirable on ``key``, mean margin), per prompt averaged over
    its desirable x undesirable combinations."""
    if not pairs:
        return None, None
    scores = [_win(good, bad, key) for good, bad in pairs]
    return _mean([w for w, _ in scores]), _mean([m for _, m in scores])


def pair_wins(result: dict[str, Any], rows: list[dict]) -> dict[str, float]:
    """Per paired prompt of an evaluation ``result`` of ``rows`` (the rows it scored, which its per-row entries
    index): the implicit-reward win, as in the pair accuracy (which is their mean). Two evaluations of the same
    rows (two steps of one run) can so be compared prompt by prompt."""
    scored = [{**r, "_prompt": _prompt_key(rows[r["index"]]["prompt"])} for r in result.get("rows") or []
              if isinstance(r.get("reward"), (int, float))]
    return {k: _win(good, bad, "reward")[0] for k, (good, bad) in _paired(scored).items()}


def drift_se(result: dict[str, Any]) -> float | None:
    """One standard error of the likelihood drift: the spread of the desirable rows' own per-token changes (tuned
    minus base) over the square root of their count. A few held-out rows (a thin split of an imbalanced file holds
    eight desirable ones) measure the drift loosely; None with fewer than two."""
    xs = [(r["tuned_logp"] - r["base_logp"]) / r["n_tokens"] for r in result.get("rows") or []
          if r.get("label") is True and r.get("n_tokens") and isinstance(r.get("tuned_logp"), (int, float))
          and isinstance(r.get("base_logp"), (int, float))]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def evaluate_rows(model, tokenizer, rows: list[dict], *, beta: float, max_length: int | None,
                  max_tokens: int = 2048, progress: Progress = None) -> dict[str, Any]:
    """Evaluate KTO rows (prompt, completion, label) on a PEFT model whose tuned adapter is active."""
    items, kept, skipped = tokenize_rows(tokenizer, rows, max_length)
    total, done = 2 * len(items), [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(f"scored {done[0]} / {total} completions", done[0] / total)

    pad = pad_id(tokenizer)
    with model.disable_adapter():
        base = completion_logps(model, items, pad_token_id=pad, max_tokens=max_tokens, on_batch=step)
    tuned = completion_logps(model, items, pad_token_id=pad, max_tokens=max_tokens, on_batch=step)
    return score_result(rows, items, kept, skipped, base, tuned, beta=beta, max_length=max_length)


def score_result(rows: list[dict], items: list[Tokenized], kept: list[int], skipped: int, base: list[float],
                 tuned: list[float], *, beta: float, max_length: int | None) -> dict[str, Any]:
    """The evaluation from the base and tuned log-probs of the tokenized rows (``kept`` indexes ``rows``)."""
    scored = []
    for j, i in enumerate(kept):
        r = rows[i]
        scored.append({
            "index": i, "label": bool(r["label"]), "n_tokens": len(items[j].completion_ids),
            "base_logp": base[j], "tuned_logp": tuned[j], "reward": beta * (tuned[j] - base[j]),
            "_prompt": _prompt_key(r["prompt"]),
        })
    pairs = list(_paired(scored).values())
    base_acc, _ = _pair_score(pairs, "base_logp")
    tuned_acc, _ = _pair_score(pairs, "tuned_logp")
    reward_acc, pair_margin = _pair_score(pairs, "reward")
    good_r = [s["reward"] for s in scored if s["label"]]
    bad_r = [s["reward"] for s in scored if not s["label"]]
    n_pairs = len(pairs)
    result: dict[str, Any] = {
        "beta": beta,
        "max_length": max_length,
        "n_rows": len(scored),
        "n_desirable": len(good_r),
        "n_undesirable": len(bad_r),
        "n_pairs": len(pairs),
        "n_skipped": skipped,
        "base": {**_side_stats(scored, "base_logp"), "pair_accuracy": base_acc,
                 "pair_accuracy_se": accuracy_se(base_acc, n_pairs)},
        "tuned": {**_side_stats(scored, "tuned_logp"), "pair_accuracy": tuned_acc,
                  "pair_accuracy_se": accuracy_se(tuned_acc, n_pairs)},
        "rewards": {
            "desirable": _mean(good_r),
            "undesirable": _mean(bad_r),
            # TRL's rewards/margins: mean desirable reward minus mean undesirable reward
            "margin": _mean(good_r) - _mean(bad_r) if good_r and bad_r else None,
            "pair_margin": pair_margin,
            "pair_accuracy": reward_acc,
            "pair_accuracy_se": accuracy_se(reward_acc, n_pairs),
        },
        "rows": [{k: v for k, v in s.items() if k != "_prompt"} for s in scored],
    }
    result["drift"] = drift_of(result)
    result["verdict"] = verdict(result)
    if not pairs:
        result["note"] = ("no prompt has both a desirable and an undesirable completion, so the pair metrics are "
                          "empty; the log-prob gap compares all desirable with all undesirable completions")
    return result


def held_out_rows(run_dir: str | Path, data=None, cfg=None) -> tuple[list[dict], str]:
    """The held-out rows of a run and where they came from: ``data`` if given, else the run's eval file, else the
    held-out split the run stored (``heldout.jsonl``). ``cfg``: the run's config, when the caller has read it."""
    from studio import data as data_mod
    from studio import safepaths

    # a file a person named arrives as a UserPath: bounded by safepaths in the web UI, as typed on the command line
    if safepaths.require(data, "the held-out file") is not None:
        return data_mod.load_kto(str(data)).rows, str(data)
    cfg = cfg or folder.read_config(run_dir)
    if cfg.data.eval_file:
        return data_mod.load_kto(cfg.data.eval_file).rows, cfg.data.eval_file
    if cfg.data.eval_fraction > 0:
        source = f"{cfg.data.train_file} (held-out {cfg.data.eval_fraction:.0%} split)"
        rows = folder.read_heldout(run_dir)
        if rows is None:  # a run of an older studio stored no split: the same seeded split again
            td = data_mod.prepare_training(cfg)
            rows = td.eval.to_list() if td.eval is not None else []
        return rows, source
    raise EvalError(f"run '{Path(run_dir).name}' has no held-out data (no eval file and eval fraction 0): give a "
                    "held-out file (`--data FILE` on the command line, or the file box in the Chat tab)")


@cpu_threads.released
def evaluate_run(run_dir: str | Path, data=None, limit: int | None = None, *,
                 adapter: str | Path | None = None, chat_model=None, save: bool = True,
                 progress: Progress = None) -> dict[str, Any]:
    """Evaluate a run's adapter (default: its final adapter, else its newest checkpoint) on held-out data and store
    the result as ``eval.json`` in the run folder. ``chat_model`` reuses an already loaded ``ChatModel``."""
    from studio.tuned import chat

    t0 = time.time()
    run_dir = Path(run_dir).expanduser().resolve()
    if not folder.is_run_folder(run_dir):
        raise EvalError(f"{run_dir} is not a run folder (it has no {folder.CONFIG_FILE})")
    choice = chat.resolve_adapter(adapter or run_dir)
    cfg = folder.read_config(run_dir)
    rows, source = held_out_rows(run_dir, data, cfg)
    rows = limit_rows(rows, limit)
    cm = chat_model or chat.ChatModel()
    cm.use(choice, progress=(lambda m: progress(m, 0.0)) if progress else None)
    with cm.lock:
        max_tokens = 4096 if cm.device.kind == "cuda" else 2048
        result = evaluate_rows(cm.model, cm.tokenizer, rows, beta=cfg.kto.beta, max_length=cfg.kto.max_length,
                               max_tokens=max_tokens, progress=progress)
    result["verdict"] = verdict(result, cfg.watch.max_drift)  # the run's own collapse bound
    result = _complete({
        "run": run_dir.name, "run_dir": str(run_dir), "adapter": str(choice.path), "adapter_label": choice.label,
        "base_model": cfg.model.name_or_path, "data": source, "limit": limit, **result,
        "seconds": round(time.time() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, run_dir)
    if save:
        write_eval(run_dir, result)  # the result as stored, not read back
    return result


# ---- the stored file (eval.json): its one reader and writer -------------------------------------------------------

def _count(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0


def _complete(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``data`` with every key the readers use: defaults for what an older or partial file lacks, numbers only in
    the score tables, and the keys derived from the scores (spreads, drift, verdict)."""
    data.setdefault("run", run_dir.name)
    data.setdefault("run_dir", str(run_dir))
    data.setdefault("adapter", str(run_dir / folder.ADAPTER_DIR))
    if not data.get("adapter_label"):
        which = Path(str(data.get("adapter") or folder.ADAPTER_DIR)).name
        data["adapter_label"] = f"{data['run']} · {'final adapter' if which == folder.ADAPTER_DIR else which}"
    for key in ("base_model", "limit", "beta", "max_length", "created", "note"):
        data.setdefault(key, None)
    data["data"] = data.get("data") or "the run's held-out rows"
    for key in ("n_rows", "n_desirable", "n_undesirable", "n_pairs", "n_skipped"):
        data[key] = _count(data.get(key))
    for key in ("base", "tuned", "rewards"):  # numbers only: a stray string must not break a table
        side = data.get(key) if isinstance(data.get(key), dict) else {}
        data[key] = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
                     for k, v in side.items()}
        if data[key].get("pair_accuracy") is not None and data[key].get("pair_accuracy_se") is None:
            data[key]["pair_accuracy_se"] = accuracy_se(data[key]["pair_accuracy"], data["n_pairs"])
    if not isinstance(data.get("beta"), (int, float)):
        data["beta"] = None
    if not isinstance(data.get("rows"), list):
        data["rows"] = []
    if not isinstance(data.get("drift"), (int, float)):
        data["drift"] = drift_of(data)
    v = data.get("verdict")
    if not (isinstance(v, dict) and v.get("word") in (LEARNED, NO_CHANGE, DEGENERATED)):
        data["verdict"] = verdict(data)
    return data


def write_eval(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Store an evaluation as the run's ``eval.json`` (the one writer: the engine's end-of-run score and
    ``python -m studio eval`` both come here), atomically, with every key the readers use."""
    run_dir = Path(run_dir)
    full = _complete(dict(result), run_dir)
    full["created"] = full["created"] or time.strftime("%Y-%m-%dT%H:%M:%S")
    return atomic.write(run_dir / EVAL_FILE, json.dumps(full, indent=2))


def read_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's stored evaluation with every key the readers use (defaults for keys an older or partial file
    lacks), or None when there is none or it cannot be read (truncated, garbage): a stored file never stops the
    studio from starting."""
    f = Path(run_dir) / EVAL_FILE
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        data = _complete(data, Path(run_dir))
        if data.get("created") is None:
            data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(f.stat().st_mtime))
        return data
    except Exception:  # noqa: BLE001 - a file too odd to make sense of is treated as absent
        return None


load_result = read_eval  # the earlier name


# Likelihood drift (mean log-prob per token of the desirable completions, tuned minus base) below minus this many nats
# per token: the tuned model no longer writes text like the good answers (a collapsed run: docs/RECIPES.md).
DEGENERATE_DRIFT = 1.0
LEARNED, NO_CHANGE, DEGENERATED = "learned", "no measurable change", "degenerated"


def drift_of(result: dict[str, Any]) -> float | None:
    """Likelihood drift in nats per token: the desirable completions' mean log-prob per token, tuned minus base."""
    b = (result.get("base") or {}).get("logp_per_token_desirable")
    t = (result.get("tuned") or {}).get("logp_per_token_desirable")
    if not isinstance(b, (int, float)) or not isinstance(t, (int, float)):
        return None
    return float(t) - float(b)


def _margin_se(rows: list[dict]) -> float | None:
    ok = [r for r in rows if isinstance(r, dict) and isinstance(r.get("reward"), (int, float))]
    good = [r["reward"] for r in ok if r.get("label") is True]
    bad = [r["reward"] for r in ok if r.get("label") is False]
    if len(good) < 2 or len(bad) < 2:
        return None

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return math.sqrt(var(good) / len(good) + var(bad) / len(bad))


def verdict(result: dict[str, Any], max_drift: float = DEGENERATE_DRIFT) -> dict[str, Any]:
    """'learned', 'no measurable change' or 'degenerated', with the reason in words. A drift beyond ``max_drift``
    nats per token is 'degenerated' whatever the accuracy and margin say: a collapsed model can rank pairs well
    (it lowers every completion, the bad ones a little more) while it no longer writes text."""
    drift = drift_of(result)
    rewards = result.get("rewards") or {}
    acc, n = rewards.get("pair_accuracy"), int(result.get("n_pairs") or 0)
    se = rewards.get("pair_accuracy_se")
    if se is None and acc is not None:
        se = accuracy_se(acc, n)
    margin = rewards.get("margin")
    acc_text = format_accuracy(acc, se, n)
    if drift is not None and (not math.isfinite(drift) or drift < -max_drift):
        return {"word": DEGENERATED, "drift": drift, "reason": (
            f"the tuned model finds the good answers {abs(drift):.1f} nats per token less likely than the base "
            f"model (more than {max_drift:g} is collapse): it no longer writes text like them, whatever the "
            f"held-out accuracy ({acc_text}) says")}
    if acc is not None and n:
        if se is not None and acc - 2 * se > 0.5 and (margin is None or margin > 0):
            return {"word": LEARNED, "drift": drift, "reason": (
                f"implicit-reward accuracy {acc_text} is more than two standard errors above chance (50%)")}
        return {"word": NO_CHANGE, "drift": drift, "reason": (
            f"implicit-reward accuracy {acc_text} is within two standard errors of chance (50%)"
            + (": more held-out pairs would tell a small gain from noise" if n < 50 else ""))}
    mse = _margin_se(result.get("rows") or [])
    if margin is not None and mse is not None and margin - 2 * mse > 0:
        return {"word": LEARNED, "drift": drift, "reason": (
            f"the reward margin {margin:+.3f} is more than two standard errors ({mse:.3f}) above 0")}
    return {"word": NO_CHANGE, "drift": drift, "reason": (
        "no paired prompts, and the reward margin "
        + (f"{margin:+.3f} is not clearly above 0" if margin is not None else "is unknown"))}


def verdict_line(result: dict[str, Any]) -> str:
    """One line for people: the verdict word, accuracy with count and spread, margin, drift."""
    v = result.get("verdict") or verdict(result)
    r = result.get("rewards") or {}
    drift = result.get("drift") if result.get("drift") is not None else drift_of(result)
    margin = r.get("margin")
    return (f"{v['word']}: implicit-reward accuracy "
            f"{format_accuracy(r.get('pair_accuracy'), r.get('pair_accuracy_se'), int(result.get('n_pairs') or 0))}"
            f", margin {'–' if margin is None else format(margin, '+.3f')}, likelihood drift "
            f"{'–' if drift is None else format(drift, '+.2f')} nats/token ({v['reason']})")


# ---- presentation (plain data; the Chat tab turns it into a table and a chart) ---------------------------------

TABLE_COLUMNS = ["metric", "base", "tuned", "change"]


def summary_table(result: dict[str, Any]) -> list[list[Any]]:
    """Rows of [metric, base, tuned, change] with numbers rounded for reading."""
    def num(v, pct=False):
        if v is None:
            return None
        return round(100 * v, 1) if pct else round(v, 3)

    b, t, rw = result["base"], result["tuned"], result["rewards"]
    n = int(result.get("n_pairs") or 0)
    rows = []
    for label, key, pct in [("mean log-prob, desirable", "logp_desirable", False),
                            ("mean log-prob, undesirable", "logp_undesirable", False),
                            ("log-prob gap (desirable − undesirable)", "logp_gap", False),
                            ("log-prob per token, desirable (change = likelihood drift)",
                             "logp_per_token_desirable", False),
                            (f"pairs where desirable outranks undesirable, % (n = {n})", "pair_accuracy", True),
                            ("  ± one standard error, %", "pair_accuracy_se", True)]:
        bv, tv = num(b.get(key), pct), num(t.get(key), pct)
        change = None if bv is None or tv is None or key == "pair_accuracy_se" else round(tv - bv, 3)
        rows.append([label, bv, tv, change])
    for label, key, pct in [("implicit reward, desirable (β·Δ log-prob)", "desirable", False),
                            ("implicit reward, undesirable", "undesirable", False),
                            ("implicit reward margin (pairs)", "pair_margin", False),
                            (f"implicit reward accuracy (pairs), % (n = {n})", "pair_accuracy", True),
                            ("  ± one standard error, %", "pair_accuracy_se", True)]:
        rows.append([label, None, num(rw.get(key), pct), None])
    return rows


def chart_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows (completions, model, log-prob) for a grouped bar chart of the desirable/undesirable means."""
    out = []
    for side in ("base", "tuned"):
        for label, key in (("desirable", "logp_desirable"), ("undesirable", "logp_undesirable")):
            v = result[side].get(key)
            if v is not None:
                out.append({"completions": label, "model": side, "mean log-prob": round(v, 3)})
    return out


# ---- command line ----------------------------------------------------------------------------------------------
