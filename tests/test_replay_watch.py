"""The kept-step rule on real traces: GPU runs of the 10%-desirable HH file (docs/results/trace_sweep4_gpu.jsonl.gz,
recorded under the earlier rule) replayed through the studio's Watch by experiments/replay_watch.py."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import replay_watch  # noqa: E402

TRACE = str(ROOT / "docs" / "results" / "trace_sweep4_gpu.jsonl.gz")


def test_replayed_traces_keep_the_late_steps_the_earlier_rule_threw_away_on_eight_pairs():
    runs = replay_watch.read([TRACE])
    defaults = {k: v for k, v in runs.items() if k.endswith(("desirable10-s1", "desirable10-s2", "desirable10-s3",
                                                               "desirable10-s7", "desirable10-s42"))}
    assert len(defaults) == 5
    kept, live = [], []
    for name, checks in defaults.items():
        k, last, lv = replay_watch.replay(checks)
        # the watch's own accuracy, scored again from the stored rewards, is the one the run logged
        assert k["watch"]["heldout/accuracy"] is not None
        kept.append(k["heldout"]["accuracy"])
        live.append(lv["heldout"]["accuracy"])
        assert k["step"] == last["step"], name  # eight pairs never show a clear lead of an earlier check
    seed42 = replay_watch.replay(defaults[next(k for k in defaults if k.endswith("-s42"))])
    assert seed42[2]["step"] == 36 and seed42[0]["step"] == 162  # live: drift -0.65 on 8 rows (± 0.26) ruled it out
    assert sum(kept) / 5 > sum(live) / 5 + 0.01  # 62.0% against 60.8% on the 255 pairs no run saw
