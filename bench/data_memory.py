"""Peak memory of reading and measuring a data file (issue 28, case 3): a file of one huge line and a large file of
normal rows, through ``python -m studio data`` (read, measure token lengths with the bundled model, clean, write)
and through what the Data tab does (``Workbench.load`` + ``measure``). Each run is its own process; its peak RSS
comes from ``wait4``.

    python bench/data_memory.py                      # a 256 MiB line and a 200 MB file
    python bench/data_memory.py --line-mib 1024      # the 1 GiB one-line file (needs several GB free)

Not a test: it takes minutes and the numbers depend on the machine.

Measured on the 2-core, 23 GB dev machine (CPU), max_length 128, after issue 28 (before: a 50 MiB line took 4.8 GB
to measure, and studio data on the 1 GiB line was killed at 22.5 GB):

    one line of 1024 MiB   studio data: peak RSS 3.50 GiB (3.5x the file),  95 s
                           Data tab   : peak RSS 3.03 GiB (3.0x the file), 156 s (1 row, reported as too long)
    one line of 256 MiB    studio data: 1.80 GiB;  Data tab: 0.78 GiB
    200 MB, 215,796 rows   studio data: peak RSS 1.04 GiB (5.6x the file), 235 s
                           Data tab   : peak RSS 1.08 GiB (5.8x the file), 168 s

What is left is holding the text itself (the file read whole, its lines, the parsed rows, the written copy):
measuring tokens no longer depends on one row's size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jumbled cave "
         "pack my box with five dozen liquor jugs and how vexingly quick daft zebras jump").split()

TAB = """
import sys
from studio.data.workbench import Workbench
from studio.config.run import BUNDLED_MODEL
wb = Workbench.load(sys.argv[1])
wb.measure(BUNDLED_MODEL, int(sys.argv[2]))
print(len(wb.rows), "rows;", len(wb.lengths.too_long), "too long", file=sys.stderr)
"""


def one_line(path: Path, mib: int) -> None:
    chunk = (" ".join(WORDS) + " ") * 64
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"prompt": "Write it all down.", "completion": "')
        left = mib * 2**20
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)
        f.write('", "label": true}\n')


def normal(path: Path, mb: int) -> int:
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 10**6:
            k = n % len(WORDS)
            row = {"prompt": f"Question {n}: " + " ".join(WORDS[k:] + WORDS[:k])[:300],
                   "completion": f"Answer {n}: " + " ".join(WORDS[::-1] * 4)[k:k + 700], "label": n % 3 != 0}
            line = json.dumps(row) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def peak(cmd: list[str]) -> tuple[float, float, int, str]:
    """(peak RSS GiB, seconds, exit code, last line of stderr) of ``cmd`` in its own process."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    tail = (err.strip().splitlines() or [""])[-1][:160]
    return usage.ru_maxrss / 2**20, time.time() - t0, p.returncode, tail


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--line-mib", type=int, default=256, help="size of the one-line file (1024 for 1 GiB)")
    ap.add_argument("--normal-mb", type=int, default=200, help="size of the file of normal rows")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    ap.add_argument("--only", choices=["line", "normal"], default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        cases = []
        if args.only in (None, "line"):
            f = tmp / "one-line.jsonl"
            one_line(f, args.line_mib)
            cases.append((f"one line of {args.line_mib} MiB", f))
        if args.only in (None, "normal"):
            f = tmp / "normal.jsonl"
            rows = normal(f, args.normal_mb)
            cases.append((f"{args.normal_mb} MB, {rows:,} rows", f))
        for label, f in cases:
            size = f.stat().st_size / 2**30
            for how, cmd in (
                    ("studio data", [sys.executable, "-m", "studio", "data", str(f), "--out", str(tmp / "out.jsonl"),
                                     "--overwrite", "--max-length", str(args.max_length)]),
                    ("Data tab", [sys.executable, "-c", TAB, str(f), str(args.max_length)])):
                gib, secs, code, tail = peak(cmd)
                print(f"{label:>28} ({size:.2f} GiB) · {how:<11}: peak RSS {gib:6.2f} GiB "
                      f"({gib / size:4.1f}x the file), {secs:6.1f} s, exit {code}  {tail}", flush=True)


if __name__ == "__main__":
    main()
