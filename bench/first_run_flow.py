"""Time a new user's first run in a real browser: README command -> Data -> CPU preset -> Start -> finished.

    python bench/first_run_flow.py [--data FILE|sample] [--hold-out 0.1] [--port N] [--fresh-models]

Starts `python app.py` with an empty studio home (and, with --fresh-models, an empty models folder, so the bundled
model is converted as on a fresh clone), drives Debian's chromium through Playwright, and prints the time of each
stage, the duration the Train tab predicted before Start, the longest time the progress line went without a visible
change while the run worked, and the finish message (held-out score). The load average is printed with the figures:
other work on the machine slows everything down.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz"))
    ap.add_argument("--hold-out", type=float, default=0.1)
    ap.add_argument("--port", type=int, default=random.randint(7900, 8999))
    ap.add_argument("--fresh-models", action="store_true")
    ap.add_argument("--shots", default=str(ROOT / "test-artifacts"))
    a = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=1_200_000)  # a loaded 2-core machine: waiting is what is measured

    home = Path(tempfile.mkdtemp(prefix="kto-flow-"))
    env = dict(os.environ, KTO_STUDIO_HOME=str(home / "home"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if a.fresh_models:
        env["KTO_STUDIO_MODELS"] = str(home / "models")
    marks: dict[str, float] = {}
    t0 = time.time()
    print(f"load average at start: {load()} (cores: {os.cpu_count()})", flush=True)
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(a.port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{a.port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("app exited:\n" + (home / "app.log").read_text())
                time.sleep(0.5)
        marks["app up"] = time.time()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("text=KTO Studio")
            # Data: load the file (the sample by name; any other file uploaded, as a user without --allow-path
            # does), hold some rows out, save the cleaned copy
            page.get_by_role("tab", name="Data").click()
            if a.data == "sample":
                box = page.locator("#data-path textarea, #data-path input").first
                box.fill(a.data)
                page.locator("#data-load").click()
            else:
                page.locator("#data-upload input[type=file]").set_input_files(a.data)
            summary = page.locator("#data-summary")
            expect(summary).to_contain_text(re.compile("KTO rows|Cannot use"), timeout=300_000)
            if "KTO rows" not in summary.inner_text():
                raise SystemExit("Data tab: " + summary.inner_text())
            marks["data loaded"] = time.time()
            frac = page.locator("#data-eval-fraction input[type=number]")
            frac.fill(str(a.hold_out))
            frac.press("Enter")
            page.locator("#data-save").click()
            expect(page.locator("#data-saved")).to_contain_text("Saved")
            marks["data saved"] = time.time()
            print("Data tab:", page.locator("#data-saved").inner_text().replace("\n", " "), flush=True)
            # Model & preset: the CPU card
            page.get_by_role("tab", name="Model & preset").click()
            page.locator("#gpu-preset input").click()
            page.get_by_role("option", name="CPU only").click()
            expect(page.locator("#fit-settings")).to_contain_text("CPU only")
            print("Model tab:", page.locator("#fit-settings").inner_text().replace("\n", " "), flush=True)
            # Train: the expected duration, then Start
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#train-expected")).to_contain_text("Expected duration")
            page.wait_for_timeout(1500)
            print("Train tab before Start:", page.locator("#train-expected").inner_text(), flush=True)
            page.locator("#train-start").click()
            marks["start pressed"] = time.time()
            last_text, last_change, longest, longest_at = None, time.time(), 0.0, ""
            phases_seen = []
            while True:
                # the studio's own line (Gradio may put its queue timer, e.g. "0.1s", above it while updating)
                lines = [ln for ln in page.locator("#train-progress").inner_text().splitlines() if ln.strip()]
                text = lines[-1] if lines else ""
                now = time.time()
                if text != last_text:
                    gap = now - last_change
                    if gap > longest:
                        longest, longest_at = gap, (last_text or "")[:120]
                    last_text, last_change = text, now
                    head = text.split("·")[0].strip()
                    if not phases_seen or phases_seen[-1] != head:
                        phases_seen.append(head)
                        print(f"  {now - marks['start pressed']:6.0f} s  {text[:150]}", flush=True)
                status = page.locator("#train-status").inner_text()
                if any(w in status for w in ("✅ finished", "❌ failed", "⏹ stopped")):
                    break
                time.sleep(0.5)
            marks["finished"] = time.time()
            page.screenshot(path=str(Path(a.shots) / "flow-finished.png"), full_page=True)
            print("Status:", status.replace("\n", " "), flush=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    prev = t0
    print(f"\nload average at the end: {load()}")
    for k, t in marks.items():
        print(f"{k:15s} at {t - t0:6.0f} s  (+{t - prev:5.0f} s)")
        prev = t
    print(f"README command -> finished run: {marks['finished'] - t0:.0f} s; Start -> finished: "
          f"{marks['finished'] - marks['start pressed']:.0f} s")
    print(f"longest time the progress line did not change while working: {longest:.1f} s (at: {longest_at!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
