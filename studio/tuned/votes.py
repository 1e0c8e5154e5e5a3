"""Blind A/B votes: is one model better than another? A win rate with its uncertainty, and votes that become data.

Two *contenders* answer the same prompt with the same sampling settings and seed: any two of the base model and the
saved adapters of runs on that base (one model in memory, ``studio.tuned.chat`` switches adapters on it). They are shown
as "A" and "B" in an order drawn at random for each prompt; the user picks A better / B better / tie / both bad and
only then sees which was which.

Each vote is stored in the studio's SQLite history (``History.add_vote``: what was shown as A and B, the prompt,
both replies, the settings and the choice) and turned into KTO rows in the feedback file that the Data tab's
"use my chat ratings" loads with the 👍/👎 rows: the preferred reply desirable and the other undesirable, both bad →
both undesirable, tie → no row.

Per pair of contenders the votes give wins / ties / losses and the win rate among the votes that picked a side, with
a 95% Wilson score interval. No Gradio here: the A/B section of the Chat tab and ``python -m studio votes`` use it.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from studio.errors import StudioError
from studio.runs import folder

CHOICES = ("A", "B", "tie", "both_bad")
CHOICE_TEXT = {"A": "A is better", "B": "B is better", "tie": "tie", "both_bad": "both bad"}
BASE = "base"  # the value that names the base model (adapter off) among the contenders
FEEDBACK_SIDE = "A/B vote"  # the 'side' of a vote's rows in the feedback file
Z95 = 1.959963984540054


class VoteError(StudioError, ValueError):
    """Something the user can fix (two identical contenders, different base models, no prompts...)."""


# ---- the interval ------------------------------------------------------------------------------------------------

def wilson(wins: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``wins / n`` (95% by default); (0, 1) when ``n`` is 0.

    Unlike the textbook p ± z·√(p(1−p)/n) it stays inside [0, 1] and is not zero-width at 0 or n wins, which matters
    for the handful of votes a person casts."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= wins <= n:
        raise ValueError(f"wins must be between 0 and n, got {wins} of {n}")
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- contenders --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    """One side of a comparison. ``id`` is stored with the votes: an adapter folder, or ``base:<model>``."""

    id: str
    label: str
    adapter: str  # the adapter to load; for the base model any adapter on that base (it is switched off)
    tuned: bool

    def public(self) -> dict[str, str]:
        return {"id": self.id, "label": self.label}


def base_label(name_or_path: str) -> str:
    short = Path(name_or_path.split(":")[-1]).name or name_or_path
    return f"base {short} (adapter off)"


def contenders(first: str | None, second: str | None) -> tuple[Contender, Contender]:
    """The two contenders from the UI's choices: ``"base"`` or an adapter / run folder each.

    The base model is the base of the other side's adapter; two adapters must share their base model, so that one
    model in memory serves both."""
    from studio.tuned import chat

    if not first or not second:
        raise VoteError("pick two models to compare")
    if first == BASE and second == BASE:
        raise VoteError("pick at least one adapter: the base model against itself can only tie")
    adapters = {s: chat.resolve_adapter(s) for s in (first, second) if s != BASE}
    if first == second or len({a.path for a in adapters.values()}) < len(adapters):
        raise VoteError("pick two different models: the same model on both sides can only tie")
    bases = {s: folder.read_config(a.run_dir).model.name_or_path for s, a in adapters.items()}
    if len(set(bases.values())) > 1:
        a, b = (adapters[s].label for s in (first, second))
        raise VoteError(f"{a} and {b} were trained on different base models ({' vs '.join(bases.values())}): "
                        "compare adapters of the same base model")

    def make(spec: str, other: str) -> Contender:
        if spec == BASE:
            a = adapters[other]
            name = bases[other]
            return Contender(f"base:{name}", base_label(name), str(a.path), False)
        a = adapters[spec]
        return Contender(str(a.path), a.label, str(a.path), True)

    return make(first, second), make(second, first)


def assign(first: Contender, second: Contender, rng: random.Random | None = None) -> tuple[Contender, Contender]:
    """Which contender is shown as A and which as B, drawn afresh for each prompt."""
    rng = rng or random.SystemRandom()
    return (first, second) if rng.random() < 0.5 else (second, first)


def stream_reply(chat_model, who: Contender, messages: list[dict], settings) -> Iterator[str]:
    """The reply of one contender as it grows (``studio.tuned.chat.ChatModel.stream`` with its adapter on, or all off)."""
    chat_model.use(who.adapter)
    yield from chat_model.stream(messages, tuned=who.tuned, settings=settings)


# ---- prompts -----------------------------------------------------------------------------------------------------

def prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def as_messages(prompt: Any) -> list[dict]:
    """A data row's prompt (chat messages, or plain text) as chat messages ending with the user's turn."""
    from studio.tuned.chat import content_text

    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    msgs = [{"role": m.get("role"), "content": content_text(m.get("content"))} for m in prompt or []
            if isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")]
    if not msgs or msgs[-1]["role"] != "user":
        raise VoteError("this prompt does not end with a user turn, so there is nothing to answer")
    return msgs


def prompt_pool(run_dir: str | Path | None = None, data=None) -> tuple[list[Any], str]:
    """The distinct prompts to vote on, in file order: from ``data`` (a ``safepaths.UserPath``: the A/B tab's box
    passes through ``safepaths.ui_read``) if given, else the run's held-out rows."""
    from studio import safepaths
    from studio.tuned import evaluate

    safepaths.require(data, "the prompt file")
    if not data and not run_dir:
        raise VoteError("no prompts: give a prompt file, or compare a run's adapter (its held-out prompts are used)")
    try:
        rows, source = evaluate.held_out_rows(run_dir, data) if run_dir else evaluate.held_out_rows(".", data)
    except evaluate.EvalError as e:
        raise VoteError(f"{e}; or type your own prompt") from e
    seen, pool = set(), []
    for r in rows:
        k = prompt_key(r["prompt"])
        if k not in seen:
            seen.add(k)
            pool.append(r["prompt"])
    if not pool:
        raise VoteError(f"{source} holds no prompts")
    return pool, source


def next_prompt(pool: list[Any], voted: Iterable[Any] = (), rng: random.Random | None = None) -> Any | None:
    """A prompt of ``pool`` not voted on yet (at random), or None when every one has a vote."""
    done = {prompt_key(p) for p in voted}
    left = [p for p in pool if prompt_key(p) not in done]
    return (rng or random.SystemRandom()).choice(left) if left else None


# ---- votes -------------------------------------------------------------------------------------------------------

def winner(vote: dict) -> str | None:
    """The id of the contender the vote preferred; None for a tie or both bad."""
    return {"A": vote["model_a"], "B": vote["model_b"]}.get(vote["choice"])


def kto_rows(vote: dict) -> list[dict[str, Any]]:
    """The KTO rows a vote makes: the preferred reply desirable and the other undesirable; both bad → both
    undesirable; tie → none. A reply with no text makes no row, and two identical replies make no preference (only
    'both bad' marks that one text undesirable)."""
    choice = vote["choice"]
    if choice not in CHOICES:
        raise VoteError(f"unknown choice {choice!r}: one of {', '.join(CHOICES)}")
    replies = {"A": (vote["reply_a"] or "", vote["label_a"]), "B": (vote["reply_b"] or "", vote["label_b"])}
    if choice == "tie":
        return []
    if choice == "both_bad":
        labels = {"A": False, "B": False}
    else:
        if replies["A"][0].strip() == replies["B"][0].strip():
            return []
        labels = {choice: True, "B" if choice == "A" else "A": False}
    rows, texts = [], set()
    for side in ("A", "B"):
        text, label = replies[side]
        if not text.strip() or text.strip() in texts:
            continue
        texts.add(text.strip())
        rows.append({"prompt": vote["prompt"], "completion": text, "label": labels[side], "adapter": label})
    return rows


def record(history, *, a: Contender, b: Contender, prompt: Any, reply_a: str, reply_b: str, choice: str,
           settings: dict | None = None, base_model: str | None = None, feedback_path=None) -> dict[str, Any]:
    """Store a vote in the history and add its KTO rows to the feedback file; returns the stored vote.

    ``prompt`` is the prompt as a data row stores it (chat messages, or text for a model without a chat template)."""
    from studio.data import feedback

    if choice not in CHOICES:
        raise VoteError(f"unknown choice {choice!r}: one of {', '.join(CHOICES)}")
    vote = {"model_a": a.id, "label_a": a.label, "model_b": b.id, "label_b": b.label, "choice": choice,
            "prompt": prompt, "reply_a": reply_a, "reply_b": reply_b, "settings": dict(settings or {}),
            "base_model": base_model, "created_at": time.time()}
    vote["id"] = history.add_vote(vote)
    for row in kto_rows(vote):
        feedback.record(row["prompt"], row["completion"], row["label"], side=FEEDBACK_SIDE, adapter=row["adapter"],
                        base_model=base_model, path=feedback_path)
    return vote


# ---- tallies -----------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@dataclass
class Tally:
    """The votes between two contenders, seen from ``candidate`` (its wins are ``reference``'s losses)."""

    reference: str
    reference_label: str
    candidate: str
    candidate_label: str
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0
    history: tuple[str, ...] = ()  # 'win' / 'loss' / 'tie' / 'both_bad', vote by vote

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.ties + self.both_bad

    @property
    def decided(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.decided if self.decided else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.wins, self.decided)

    @property
    def verdict(self) -> str:
        if not self.decided:
            return "no vote has picked a side yet"
        lo, hi = self.interval
        if lo > 0.5:
            return "better (the whole interval is above 50%)"
        if hi < 0.5:
            return "worse (the whole interval is below 50%)"
        if self.wins > self.losses:
            return "likely better, vote more to be sure"
        if self.wins < self.losses:
            return "likely worse, vote more to be sure"
        return "no difference so far, vote more"

    def sentence(self) -> str:
        """"tuned wins 14 of 20, 70%, interval 48–85%: likely better, vote more to be sure" and what was not
        counted."""
        if not self.votes:
            return f"No votes yet between {self.candidate_label} and {self.reference_label}."
        others = [f"{n} {what}" for n, what in ((self.ties, "tie" if self.ties == 1 else "ties"),
                                                 (self.both_bad, "both bad")) if n]
        aside = f" ({' and '.join(others)} not counted)" if others else ""
        if not self.decided:
            return (f"{self.candidate_label} vs {self.reference_label}: {self.votes} votes, none picked a side"
                    f"{aside}; vote more.")
        lo, hi = self.interval
        return (f"{self.candidate_label} wins {self.wins} of {self.decided} against {self.reference_label}, "
                f"{_pct(self.win_rate)}, interval {100 * lo:.0f}–{100 * hi:.0f}%: {self.verdict}{aside}.")

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"reference": self.reference_label, "candidate": self.candidate_label, "reference_id": self.reference,
                "candidate_id": self.candidate, "votes": self.votes, "wins": self.wins, "losses": self.losses,
                "ties": self.ties, "both_bad": self.both_bad,
                "win_rate": round(self.win_rate, 4) if self.win_rate is not None else None,
                "interval_95": [round(lo, 4), round(hi, 4)] if self.decided else None, "verdict": self.verdict,
                "sentence": self.sentence()}


def _outcome(vote: dict, candidate: str) -> str:
    if vote["choice"] in ("tie", "both_bad"):
        return vote["choice"]
    return "win" if winner(vote) == candidate else "loss"


def tally(votes: Iterable[dict], reference: Contender | str, candidate: Contender | str) -> Tally:
    """The votes between two contenders (in either order on screen), from ``candidate``'s side."""
    ref_id = reference.id if isinstance(reference, Contender) else reference
    cand_id = candidate.id if isinstance(candidate, Contender) else candidate
    labels = {ref_id: getattr(reference, "label", ref_id), cand_id: getattr(candidate, "label", cand_id)}
    t = Tally(ref_id, labels[ref_id], cand_id, labels[cand_id])
    outcomes = []
    for v in votes:
        if {v["model_a"], v["model_b"]} != {ref_id, cand_id}:
            continue
        # the newest names: a label changes when a run is renamed, its id (the folder) does not
        labels.update({v["model_a"]: v["label_a"], v["model_b"]: v["label_b"]})
        outcomes.append(_outcome(v, cand_id))
    t.reference_label, t.candidate_label = labels[ref_id], labels[cand_id]
    t.wins, t.losses = outcomes.count("win"), outcomes.count("loss")
    t.ties, t.both_bad = outcomes.count("tie"), outcomes.count("both_bad")
    t.history = tuple(outcomes)
    return t


def tallies(votes: list[dict]) -> list[Tally]:
    """One tally per pair of contenders that has votes, in the order first voted; the base model (else the
    contender shown first) is the reference."""
    pairs: list[tuple[str, str]] = []
    for v in votes:
        a, b = v["model_a"], v["model_b"]
        if any({a, b} == set(p) for p in pairs):
            continue
        pairs.append((b, a) if b.startswith("base:") and not a.startswith("base:") else (a, b))
    return [tally(votes, ref, cand) for ref, cand in pairs]


def find_pair(votes: list[dict], spec: str) -> Tally:
    """The tally for ``--pair X,Y``: each name an id, a label, a run name or ``base``; X is the reference."""
    names = [s.strip() for s in spec.split(",")]
    if len(names) != 2 or not all(names):
        raise VoteError(f"--pair needs two names separated by a comma, got {spec!r}")
    known: dict[str, str] = {}
    for v in votes:
        known.update({v["model_a"]: v["label_a"], v["model_b"]: v["label_b"]})

    def match(name: str) -> str:
        for test in (lambda i, lab: i == name or lab == name,
                     lambda i, lab: name == BASE and i.startswith("base:"),
                     lambda i, lab: lab == f"{name} · final adapter",
                     lambda i, lab: lab.split(" · ")[0] == name):
            found = sorted({i for i, lab in known.items() if test(i, lab)})
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise VoteError(f"{name!r} matches several models: {', '.join(known[i] for i in found)}; "
                                "give its full label or folder")
        raise VoteError(f"no votes involve {name!r}; voted models: {', '.join(sorted(known.values())) or 'none'}")

    return tally(votes, match(names[0]), match(names[1]))


# ---- export ------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ["id", "time", "model_a", "model_b", "choice", "winner", "prompt", "reply_a", "reply_b", "temperature",
               "top_p", "seed", "max_new_tokens", "model_a_id", "model_b_id", "base_model"]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def export_csv(votes: list[dict], path: str | Path) -> Path:
    """Every vote as one CSV row (the prompt as 'role: text' lines). Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for v in votes:
            s = v.get("settings") or {}
            won = winner(v)
            w.writerow([v.get("id"), time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(v.get("created_at", 0))),
                        v["label_a"], v["label_b"], v["choice"],
                        {v["model_a"]: v["label_a"], v["model_b"]: v["label_b"]}.get(won, ""),
                        _prompt_text(v["prompt"]), v["reply_a"], v["reply_b"], s.get("temperature"), s.get("top_p"),
                        s.get("seed"), s.get("max_new_tokens"), v["model_a"], v["model_b"], v.get("base_model")])
    return path


# ---- the plot ----------------------------------------------------------------------------------------------------

def tally_figure(t: Tally):
    """The candidate's win rate after each vote that picked a side, with its 95% interval, and the vote counts."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 2.4), layout="constrained")
    ax, bars = fig.subplots(1, 2, width_ratios=[3, 1.3])
    wins = decided = 0
    xs, rate, lo, hi = [], [], [], []
    for outcome in t.history:
        if outcome in ("win", "loss"):
            decided += 1
            wins += outcome == "win"
            a, b = wilson(wins, decided)
            xs.append(decided)
            rate.append(100 * wins / decided)
            lo.append(100 * a)
            hi.append(100 * b)
    ax.axhline(50, color="#6c7a89", linestyle="--", linewidth=1)
    if xs:
        ax.fill_between(xs, lo, hi, color="#3c6e9f", alpha=0.2, label="95% interval", step=None)
        ax.plot(xs, rate, color="#3c6e9f", marker="o", markersize=3, label="win rate")
        ax.set_xlim(0.5, max(xs) + 0.5)
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.75, "no vote has picked a side yet", ha="center", transform=ax.transAxes, color="#6c7a89")
        ax.set_xticks([])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 100)
    ax.set_xlabel("votes that picked a side")
    ax.set_ylabel("win rate, %")
    ax.set_title("win rate after each vote (95% interval shaded)", fontsize=9)
    names = ["wins", "ties", "both bad", "losses"]
    counts = [t.wins, t.ties, t.both_bad, t.losses]
    bars.barh(names, counts, color=["#2e9d5b", "#6c7a89", "#e8a33d", "#d1495b"])
    bars.invert_yaxis()
    bars.set_xlabel("votes")
    bars.set_title("all votes", fontsize=9)
    bars.set_xlim(0, max(counts + [1]) * 1.25)
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, c in enumerate(counts):
        bars.text(c, i, f" {c}", va="center", fontsize=8)
    return fig
