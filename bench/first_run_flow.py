"""Time a new user's first run in a real browser: README command -> Data -> CPU preset -> Start -> finished.

    python bench/first_run_flow.py [--data FILE|sample] [--hold-out 0.1] [--port N] [--fresh-models] [--float32]

Starts `python app.py` with an empty studio home (and, with --fresh-models, an empty models folder, so the bundled
model is converted as on a fresh clone), drives Debian's chromium through Playwright, and prints the time of each
stage, the duration the Train tab predicted before Start, the longest time the progress line went without a visible
change while the run worked, and the finish message (held-out score). The load average is printed with the figures:
other work on the machine slows everything down.

``--float32``: the app plans, estimates and trains as on a CPU without native bf16 (``KTO_STUDIO_CPU_BF16=0``: most
desktop CPUs; float32 math, ~3x slower a step than bf16 autocast on a CPU with AMX/AVX-512 BF16).
At the end it prints the verdict the run stored (eval.json: the held-out statistics), the desirable held-out
completions' log-prob per token under the base and the tuned model, how many held-out prompts get a different Chat
reply from the tuned model (the Chat tab's defaults, the same seed for both), and one line
``PASS``/``FAIL`` against the first run's promise: finished, verdict "learned", README command -> finished within
``--limit`` seconds (6 minutes). Any stage that goes wrong ends it with ``FAIL at <stage>: <what>`` and the app's log
tail, exit status 1; never silently.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--data", default="sample",
                    help="a data file, or 'sample' (default): the studio's bundled sample, what a new user's first run "
                         "trains on, and on every clone (the HH file is ../shared/data/hh-harmless-dev.jsonl.gz here)")
    ap.add_argument("--hold-out", type=float, default=0.1)
    ap.add_argument("--port", type=int, default=random.randint(7900, 8999))
    ap.add_argument("--fresh-models", action="store_true")
    ap.add_argument("--shots", default=str(ROOT / "test-artifacts"))
    ap.add_argument("--float32", action="store_true", help="as on a CPU without native bf16 (float32 math)")
    ap.add_argument("--limit", type=float, default=360.0, help="seconds the first run may take (PASS/FAIL)")
    ap.add_argument("--chat-prompts", type=int, default=3, help="held-out prompts asked in Chat, base vs tuned")
    ap.add_argument("--start-timeout", type=float, default=1800.0,
                    help="seconds the app may take to answer (a loaded 2-core machine took 8-10 min with --fresh-models)")
    a = ap.parse_args()
    Path(a.shots).mkdir(parents=True, exist_ok=True)
    if a.data != "sample" and not Path(a.data).is_file():
        print(f"FAIL before starting: no data file {a.data}; pass --data FILE (the HH file is shared/data/"
              "hh-harmless-dev.jsonl.gz beside the repository) or --data sample", flush=True)
        return 1
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=1_200_000)  # a loaded 2-core machine: waiting is what is measured

    home = Path(tempfile.mkdtemp(prefix="kto-flow-"))
    env = dict(os.environ, KTO_STUDIO_HOME=str(home / "home"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if a.float32:
        env["KTO_STUDIO_CPU_BF16"] = "0"
    if a.fresh_models:
        env["KTO_STUDIO_MODELS"] = str(home / "models")
    marks: dict[str, float] = {}
    stage = ["starting the app"]  # what the flow is doing, for the message when it stops
    t0 = time.time()
    print(f"load average at start: {load()} (cores: {os.cpu_count()}; math: "
          f"{'float32 (KTO_STUDIO_CPU_BF16=0)' if a.float32 else 'as this CPU does it'})", flush=True)
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(a.port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{a.port}"
    status, longest, longest_at, run_dir = "", 0.0, "", None
    try:
        with sync_playwright() as p:
            _wait_up(url, proc, home, a.start_timeout)
            marks["app up"] = time.time()
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("text=KTO Studio")
            # Data: load the file (the sample by name; any other file uploaded, as a user without --allow-path
            # does), hold some rows out, save the cleaned copy
            stage[0] = "loading the data in the Data tab"
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
                raise Failed("Data tab: " + summary.inner_text())
            _wait_idle(page, proc, home)  # no load or measuring pass still running that a save would race
            marks["data loaded"] = time.time()
            stage[0] = "saving the data with rows held out"
            frac = page.locator("#data-eval-fraction input[type=number]")
            frac.fill(str(a.hold_out))
            frac.press("Enter")
            _wait_idle(page, proc, home)
            page.locator("#data-save").click()
            saved = _wait_saved(page, proc, home)  # the studio's own record of the save, then the page's message
            marks["data saved"] = time.time()
            print(f"Data tab: saved {saved['train_rows']} training rows and {saved['eval_rows']} held-out rows "
                  f"({Path(saved['train_file']).name}); the page says: "
                  + page.locator("#data-saved").inner_text().replace("\n", " "), flush=True)
            # Model & preset: the CPU card
            stage[0] = "picking the CPU only card"
            page.get_by_role("tab", name="Model & preset").click()
            page.locator("#gpu-preset input").click()
            page.get_by_role("option", name="CPU only").click()
            expect(page.locator("#fit-settings")).to_contain_text("CPU only")
            print("Model tab:", page.locator("#fit-settings").inner_text().replace("\n", " "), flush=True)
            # Train: the expected duration, then Start
            stage[0] = "starting the run in the Train tab"
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#train-expected")).to_contain_text("Expected duration")
            expect(page.locator("#train-card")).to_contain_text(Path(saved["train_file"]).name)
            page.wait_for_timeout(1500)
            print("Train tab before Start:", page.locator("#train-expected").inner_text(), flush=True)
            page.locator("#train-start").click()
            marks["start pressed"] = time.time()
            stage[0] = "training (waiting for the run to end)"
            last_text, last_change = None, time.time()
            phases_seen = []
            while True:
                _alive(proc, home)
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
        stage[0] = "reading the finished run"
        run_dir = _newest_run(home / "home" / "runs")
    except Exception as e:  # every way out says where and why (playwright's timeouts included)
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"\nFAIL at {stage[0]} ({time.time() - t0:.0f} s in): {what}", flush=True)
        print("app log, last lines:\n" + _tail(home / "app.log"), flush=True)
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    prev = t0
    print(f"\nload average at the end: {load()}")
    for k, t in marks.items():
        print(f"{k:15s} at {t - t0:6.0f} s  (+{t - prev:5.0f} s)")
        prev = t
    total = marks["finished"] - t0
    print(f"README command -> finished run: {total:.0f} s; Start -> finished: "
          f"{marks['finished'] - marks['start pressed']:.0f} s")
    print(f"longest time the progress line did not change while working: {longest:.1f} s (at: {longest_at!r})")
    return _verdict(a, run_dir, status, total, home)


class Failed(RuntimeError):
    """The flow cannot go on; the message says what the page or the app said."""


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _alive(proc, home: Path) -> None:
    if proc.poll() is not None:
        raise Failed(f"the app exited with status {proc.returncode}")


def _wait_up(url: str, proc, home: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            _alive(proc, home)
            if time.time() > deadline:
                raise Failed(f"the app did not answer on {url} in {timeout:.0f} s") from None
            time.sleep(0.5)


# Gradio's markers of an event still running (its progress text and bar in the outputs being updated)
BUSY = ".progress-text, .eta-bar, .progress-level"


def _wait_idle(page, proc, home: Path, timeout: float = 600) -> None:
    """Until the page shows no event in progress for a second (a load pass, a measuring pass)."""
    deadline, quiet_since = time.time() + timeout, None
    while time.time() < deadline:
        _alive(proc, home)
        if page.locator(BUSY).count() == 0:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= 1.0:
                return
        else:
            quiet_since = None
        time.sleep(0.25)
    raise Failed(f"the page still showed work in progress after {timeout:.0f} s: "
                 + " | ".join(page.locator(BUSY).all_inner_texts())[:300])


def _wait_saved(page, proc, home: Path, timeout: float = 600) -> dict:
    """The save as the studio recorded it: the summary it writes beside the cleaned file (studio.data.clean.
    save_clean), and then the Data tab's message naming that file; a 'Not saved' message ends the flow with it."""
    data = home / "home" / "data"
    deadline = time.time() + timeout
    while time.time() < deadline:
        _alive(proc, home)
        said = page.locator("#data-saved").inner_text()
        if "Not saved" in said or "Load data first" in said:
            raise Failed("Data tab: " + said.replace("\n", " "))
        for f in sorted(data.glob("*.summary.json")) if data.is_dir() else []:
            try:
                summary = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being written
            if Path(summary.get("train_file") or "").name and Path(summary["train_file"]).name in said \
                    and re.search(r"Saved \d", said):
                return summary
        time.sleep(0.5)
    raise Failed(f"no save recorded in {data} with the Data tab's message in {timeout:.0f} s; the page says: "
                 + page.locator("#data-saved").inner_text()[:300])


def _newest_run(runs: Path) -> Path:
    folders = [d for d in runs.iterdir() if d.is_dir()] if runs.is_dir() else []
    if not folders:
        raise Failed(f"no run folder in {runs}")
    return max(folders, key=lambda d: d.stat().st_mtime)


def _verdict(a, run_dir: Path, status: str, total: float, home: Path) -> int:
    """What the run stored about its held-out rows, the Chat replies base vs tuned, and PASS/FAIL."""
    os.environ["KTO_STUDIO_HOME"] = str(home / "home")
    if a.fresh_models:
        os.environ["KTO_STUDIO_MODELS"] = str(home / "models")
    sys.path.insert(0, str(ROOT))
    from studio.runs import folder
    from studio.tuned import evaluate

    finished = "✅ finished" in status
    result = evaluate.read_eval(run_dir) or {}
    word = (result.get("verdict") or {}).get("word")
    cfg = folder.read_config(run_dir)
    planned = folder.read_plan(run_dir) or {}
    t = cfg.train
    math_ = "bf16 autocast" if planned.get("autocast") else planned.get("dtype", "?")
    print(f"\nrun {run_dir.name}: max_length {cfg.kto.max_length}, batch {t.per_device_train_batch_size} x "
          f"{t.gradient_accumulation_steps}, max_steps {t.max_steps}, lr {t.learning_rate:g}, math {math_}, "
          f"held-out rows scored at most {cfg.data.eval_max_rows}, watch every {cfg.watch.every_steps}")
    if result:
        print("held-out verdict:", evaluate.verdict_line(result))
        b, tu = result.get("base") or {}, result.get("tuned") or {}
        print(f"desirable held-out completions, log-prob per token: base {b.get('logp_per_token_desirable')}, "
              f"tuned {tu.get('logp_per_token_desirable')} (collapse shows as a fall of nats)")
    else:
        print("held-out verdict: none stored (eval.json missing)")
    ok = finished and word == evaluate.LEARNED and total <= a.limit
    why = [w for w, bad in (("the run did not finish", not finished),
                            (f"verdict {word!r}, not 'learned'", word != evaluate.LEARNED),
                            (f"{total:.0f} s > {a.limit:.0f} s", total > a.limit)) if bad]
    print(f"\n{'PASS' if ok else 'FAIL'}: first run {'finished' if finished else 'not finished'}, verdict "
          f"{word or '-'}, README command -> finished {total:.0f} s (limit {a.limit:.0f} s)"
          + ("" if ok else " - " + "; ".join(why)) + f"; load average {load()}", flush=True)
    if finished and a.chat_prompts > 0:  # after the verdict: generating on a loaded CPU can take minutes
        try:
            _chat(run_dir, cfg, a.chat_prompts)
        except Exception as e:  # the figures above stand without it
            print(f"Chat check could not run: {e}")
    return 0 if ok else 1


def _chat(run_dir: Path, cfg, n: int) -> None:
    """The Chat tab's reply, base and tuned (its default settings, one seed for both), on held-out prompts."""
    from studio.data import load_kto
    from studio.tuned.chat import ChatModel, GenerationSettings

    if not cfg.data.eval_file:
        print("Chat check: no held-out file")
        return
    prompts, seen = [], set()
    for r in load_kto(cfg.data.eval_file, strict=False).rows:
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(r["prompt"])
    chat = ChatModel()
    chat.use(run_dir)
    differ = 0
    settings = GenerationSettings(max_new_tokens=60)
    for prompt in prompts[:n]:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        base, tuned = chat.reply(messages, tuned=False, settings=settings), chat.reply(messages, True, settings)
        differ += base.strip() != tuned.strip()
        if differ == 1 and base.strip() != tuned.strip():
            print(f"Chat, a held-out prompt: {str(messages[-1]['content'])[-120:]!r}\n  base:  {base[:200]!r}\n"
                  f"  tuned: {tuned[:200]!r}")
    print(f"Chat check: {differ} of {min(n, len(prompts))} held-out prompts get a different reply from the tuned "
          "model (Chat tab defaults, the same seed)")


if __name__ == "__main__":
    sys.exit(main())
