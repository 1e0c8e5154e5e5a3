"""How long the studio takes to load a ~200 MB data file (issue 18, point 7).

Builds a JSONL file of about ``--mb`` MB in a temporary folder by repeating the real HH preference pairs of
``../shared/data/hh-harmless-dev.jsonl.gz`` (each copy's prompts get a copy number so rows stay distinct), then
loads it the way the Data tab and ``python -m studio data`` do (``studio.data.load_kto``, non-strict) and prints the
file size, the rows, the seconds per phase and the progress messages' count. Nothing is written outside the
temporary folder, which is removed at the end.

    python bench/load_data.py [--mb 200] [--source ../shared/data/hh-harmless-dev.jsonl.gz]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(source: Path, out: Path, mb: float) -> int:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    target, written, copy, n = int(mb * 2**20), 0, 0, 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target:
            copy += 1
            for p in pairs:
                row = {k: (v.replace("\n\nHuman: ", f"\n\nHuman: [{copy}] ", 1) if isinstance(v, str) else v)
                       for k, v in p.items()}
                line = json.dumps(row, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n += 1
                if written >= target:
                    break
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz"))
    args = ap.parse_args()
    from studio.data import load_kto

    with tempfile.TemporaryDirectory(prefix="kto-load-bench-") as tmp:
        path = Path(tmp) / "big.jsonl"
        t = time.perf_counter()
        n_pairs = build(Path(args.source), path, args.mb)
        print(f"built {path.name}: {path.stat().st_size / 2**20:.1f} MiB, {n_pairs} pairs "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
        events: list[tuple[float, float, str]] = []
        t0 = time.perf_counter()

        def progress(fraction, message):
            events.append((time.perf_counter() - t0, fraction, message))

        norm = load_kto(str(path), strict=False, progress=progress)
        total = time.perf_counter() - t0
        phases: dict[str, float] = {}
        last_t, last_phase = 0.0, None
        for at, _, msg in events:
            phase = msg.split(" ")[0]
            if last_phase is not None:
                phases[last_phase] = phases.get(last_phase, 0.0) + at - last_t
            last_t, last_phase = at, phase
        if last_phase is not None:
            phases[last_phase] = phases.get(last_phase, 0.0) + total - last_t
        print(f"loaded {len(norm.rows)} KTO rows ({norm.shape}) in {total:.1f} s; "
              f"{len(events)} progress updates; phases: " +
              ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
