"""Desirable / undesirable loss weights, as the KTO paper advises.

KTO weighs the two kinds of rows separately; the paper (Ethayarajh et al., 2024, section 4) recommends choosing
lambda_D and lambda_U so that (lambda_D * n_D) / (lambda_U * n_U) lies in [1, 4/3]. We keep the majority label at
weight 1 and raise the minority's weight, the way the paper's own imbalanced runs do (1 desirable : 10 undesirable ->
lambda_D around 10-13), aiming near the top of the range (1.3, with room for rounding): on the HH dev file thinned
to 10% desirable rows, λD at the top of the range (13.3, ratio 1.33) against the middle (11.7, ratio 1.17) left the
held-out accuracy alike (62.1% vs 62.2%, 5 seeds) and the good answers' likelihood drift smaller in every seed (mean
-0.17 vs -0.29 nat per token at step 126 of 162; docs/results/trace_sweep5_gpu.jsonl.gz): the scarce label's pull
keeps the model from lowering everything while it learns from the plentiful one.

A file that is about balanced keeps 1.0 / 1.0, the weights every balanced run of README and docs/RECIPES.md was
measured with: the accepted range starts at 0.9 (desirable rows up to 10% fewer than undesirable ones), so dropping
a few duplicates or flipping a few labels of a balanced file never turns the suggestion into 1.3 / 1.0 and back.
Weights are suggested only for a file outside [0.9, 4/3].
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_LOW = 1.0  # the KTO paper's lower bound
LOW, HIGH = 0.9, 4 / 3  # what the studio accepts: the paper's range with room for about balanced files
TARGET = 1.3  # near HIGH: see the module doc


def ratio(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
          undesirable_weight: float = 1.0) -> float | None:
    """(λD·nD)/(λU·nU), or None when one label is absent (the ratio is then meaningless)."""
    if n_desirable <= 0 or n_undesirable <= 0 or undesirable_weight <= 0:
        return None
    return (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)


def in_range(r: float | None) -> bool:
    return r is not None and LOW - 1e-9 <= r <= HIGH + 1e-9


@dataclass
class Balance:
    n_desirable: int
    n_undesirable: int
    desirable_weight: float
    undesirable_weight: float
    note: str

    @property
    def ratio(self) -> float | None:
        return ratio(self.n_desirable, self.n_undesirable, self.desirable_weight, self.undesirable_weight)

    @property
    def in_range(self) -> bool:
        return in_range(self.ratio)

    def as_dict(self) -> dict:
        r = self.ratio
        return {"desirable_weight": self.desirable_weight, "undesirable_weight": self.undesirable_weight,
                "ratio": None if r is None else round(r, 4), "in_range": self.in_range,
                "target_range": [LOW, round(HIGH, 4)], "note": self.note}


def suggest_weights(n_desirable: int, n_undesirable: int) -> Balance:
    """Weights that bring the ratio into [0.9, 4/3]; 1.0 / 1.0 when it already is (an about balanced file), or when
    one label is missing."""
    if n_desirable == 0 and n_undesirable == 0:
        return Balance(0, 0, 1.0, 1.0, "no labelled rows")
    if n_desirable == 0 or n_undesirable == 0:
        only = "desirable" if n_undesirable == 0 else "undesirable"
        return Balance(n_desirable, n_undesirable, 1.0, 1.0,
                       f"every row is {only}. KTO can still train on one label (unlike DPO it needs no pairs: its "
                       "reference point comes from mismatched prompt/completion pairs within each batch); the "
                       "ratio is undefined, so the weights stay 1.0. Adding some "
                       f"{'undesirable' if only == 'desirable' else 'desirable'} rows usually helps.")
    plain = ratio(n_desirable, n_undesirable)
    if in_range(plain):
        return Balance(n_desirable, n_undesirable, 1.0, 1.0,
                       f"{n_desirable} desirable vs {n_undesirable} undesirable rows are about balanced (already in "
                       "the KTO range): the weights stay 1.0 and 1.0, the defaults the studio's runs were measured "
                       "with")
    if plain < LOW:  # fewer desirable rows: weigh them up
        wd, wu = _round_into_range(TARGET * n_undesirable / n_desirable, n_desirable, n_undesirable, up=True), 1.0
        minority = "desirable"
    else:  # too many desirable rows: weigh the undesirable ones up
        wd, wu = 1.0, _round_into_range(n_desirable / (TARGET * n_undesirable), n_desirable, n_undesirable, up=False)
        minority = "undesirable"
    b = Balance(n_desirable, n_undesirable, wd, wu, "")
    w = b.desirable_weight if minority == "desirable" else b.undesirable_weight
    b.note = (f"{n_desirable} desirable vs {n_undesirable} undesirable rows: each {minority} row counts {w:g} times, "
              f"so all desirable rows together weigh {in_words(b.ratio)} the undesirable ones; the KTO paper "
              "advises between 1 and 1.33 times")
    return b


def in_words(r: float) -> str:
    """A weighted ratio as words: '1.30 times as much as'."""
    return f"{r:.2f} times as much as"


def _round_into_range(w: float, nd: int, nu: int, up: bool) -> float:
    """``w`` rounded to 3 significant-ish digits, nudged back if rounding left the range."""
    for digits in (2, 3, 4, 6):
        r = round(w, digits)
        if in_range(ratio(nd, nu, r, 1.0) if up else ratio(nd, nu, 1.0, r)):
            return r
    return w


def check(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A warning when the chosen weights put the ratio outside [1, 4/3]; None when they are fine or it is undefined."""
    r = ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if r is None or in_range(r):
        return None
    s = suggest_weights(n_desirable, n_undesirable)
    return (f"with desirable_weight {desirable_weight:g} on {n_desirable} desirable rows and undesirable_weight "
            f"{undesirable_weight:g} on {n_undesirable} undesirable rows, the desirable rows together weigh "
            f"{in_words(r)} the undesirable ones, {'less' if r < LOW else 'more'} than the KTO paper advises "
            f"(1 to 1.33 times): try desirable_weight={s.desirable_weight}, "
            f"undesirable_weight={s.undesirable_weight}")
