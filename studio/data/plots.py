"""Figures for the Data tab (matplotlib, no Gradio): token-length histograms and the balance gauge.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing piles up in a global figure list
while a server runs for days.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from studio.data.balance import HIGH, LOW
from studio.data.inspect import TokenLengths

GOOD, BAD, NEUTRAL, WARN = "#2e9d5b", "#d1495b", "#6c7a89", "#e8a33d"


def length_figure(lengths: TokenLengths, max_length: int | None = None, bins: int = 30) -> Figure:
    """Histograms of prompt, completion and total tokens; max_length drawn on the total, rows beyond it counted."""
    fig = Figure(figsize=(9, 2.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, values, color) in zip(axes, (("prompt", lengths.prompt, NEUTRAL),
                                                ("completion", lengths.completion, GOOD),
                                                ("prompt + completion", lengths.total, "#3c6e9f"))):
        if values:
            ax.hist(values, bins=min(bins, max(1, len(set(values)))), color=color)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    if max_length and lengths.total:
        over = sum(1 for t in lengths.total if t > max_length)
        ax = axes[2]
        ax.set_title(f"prompt + completion\n{over} over max_length={max_length}", fontsize=10)
        longest = max(lengths.total)
        if max_length <= 1.5 * longest:
            ax.axvline(max_length, color=BAD, linestyle="--", linewidth=1.5)
            ax.set_xlim(left=0, right=max(longest, max_length) * 1.05)
        # a limit far beyond every row would squash the histogram into a sliver: leave it to the title
    return fig


def gauge_figure(ratio: float | None) -> Figure:
    """Where (λD·nD)/(λU·nU) sits against the KTO paper's [1, 4/3] band, on a log axis from 1/4 to 4."""
    fig = Figure(figsize=(6, 1.4), layout="constrained")
    ax = fig.subplots()
    lo, hi = 0.25, 4.0
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1)
    ax.axvspan(lo, LOW, color=WARN, alpha=0.25)
    ax.axvspan(LOW, HIGH, color=GOOD, alpha=0.45)
    ax.axvspan(HIGH, hi, color=WARN, alpha=0.25)
    ticks = [0.25, 0.5, LOW, 4 / 3, 2, 4]
    ax.set_xticks(ticks, ["¼", "½", f"{LOW:g}", "4/3", "2", "4"])
    ax.minorticks_off()
    ax.set_yticks([])
    if ratio is None:
        ax.set_title("ratio undefined: only one label", fontsize=10)
    else:
        shown = min(max(ratio, lo * 1.02), hi / 1.02)  # keep far-off ratios visible at the edge
        ok = LOW - 1e-9 <= ratio <= HIGH + 1e-9
        ax.plot([shown], [0.5], marker="v" if ok else "X", markersize=16, color=GOOD if ok else BAD)
        ax.set_title(f"desirable rows weigh {ratio:.2f}× the undesirable: {'in' if ok else 'OUTSIDE'} the KTO range",
                     fontsize=10)
    ax.set_xlabel("desirable : undesirable, weighted")
    return fig


def marker_position(fig: Figure) -> float | None:
    """The x of the gauge's marker (for tests and screenshots' alt text)."""
    for line in fig.axes[0].get_lines():
        x = line.get_xdata()
        if len(x):
            return float(x[0])
    return None
