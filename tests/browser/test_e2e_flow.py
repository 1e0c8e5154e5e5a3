"""The whole flow a hobbyist walks through, on the bundled model, in one browser session:
upload a paired file → see it converted and balanced → save it → choose the CPU preset → train a few steps and watch
the curves → stop → resume to the end → chat with base and tuned side by side → rate a reply → export the adapter.
A screenshot of each tab lands in test-artifacts/."""
from __future__ import annotations

import json
import re

from playwright.sync_api import expect

from tests.browser.conftest import shot

TIMEOUT = 900_000  # ms; CPU training on a shared 2-core machine
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "Lyon, probably."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Six, like all insects."),
    ("What is 12 times 8?", "12 times 8 is 96.", "It is 108."),
    ("Name a primary color.", "Red is a primary color.", "Brown."),
    ("Is it safe to look at the Sun?", "No, it can damage your eyes.", "Yes, it is good for you."),
    ("What gas do we breathe?", "We need oxygen to breathe.", "Mostly helium."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.", "Charles Dickens."),
    ("Boiling point of water in Celsius?", "100 degrees Celsius at sea level.", "50 degrees."),
]


def _set(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Tab")


def _wait_until_reply_complete(page, box: str, timeout_s: float = 180) -> None:
    """Streaming ends when the reply text stops changing and Gradio no longer marks the chat as generating."""
    import time

    last, stable, deadline = None, 0, time.time() + timeout_s
    while time.time() < deadline:
        bot = page.locator(f"{box} [data-testid=bot]")
        text = bot.last.inner_text() if bot.count() else ""
        busy = page.locator(f"{box} .generating, {box} .pending").count() > 0
        stable = stable + 1 if (text and text == last and not busy) else 0
        if stable >= 3:
            return
        last = text
        time.sleep(1)
    raise AssertionError(f"{box}: the reply did not finish streaming in {timeout_s} s")


def _pick(page, elem_id: str, option) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()


def test_upload_to_export_on_the_bundled_model(page, studio_server, tmp_path, bundled_model_dir):
    home = studio_server["home"]
    upload = tmp_path / "my-pairs.jsonl"
    upload.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    original = upload.read_bytes()

    # 1. Data: the pairs are converted to KTO rows and balanced; a cleaned copy is saved and chosen for training
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-upload input[type=file]").set_input_files(str(upload))
    expect(page.locator("#data-summary")).to_contain_text("8 chosen/rejected pairs unpaired into 16 KTO rows",
                                                          timeout=120_000)
    expect(page.locator("#data-balance")).to_contain_text("8 desirable, 8 undesirable")
    page.locator("#data-save").click()
    expect(page.locator("#data-saved")).to_contain_text("Saved 16 rows", timeout=60_000)
    saved = sorted((home / "data").glob("my-pairs-clean-*.jsonl"))
    assert len(saved) == 1 and upload.read_bytes() == original
    shot(page, "e2e-1-data")

    # 2. Model & preset: the CPU preset keeps the bundled model in full precision
    page.get_by_role("tab", name="Model & preset").click()
    _pick(page, "gpu-preset", "CPU only")
    expect(page.locator("#cfg-model-backend input")).to_have_value("full")
    shot(page, "e2e-2-model")

    # 3. Train: a few steps, curves drawn, stop (adapter saved), resume to the end
    page.get_by_role("tab", name="Train").click()
    # the form takes in what the Model tab changed before it is typed in (a late reload would overwrite typing)
    expect(page.locator("#train-message")).to_contain_text("Settings updated from the other tabs")
    page.locator("#run-name textarea, #run-name input").first.fill("e2e")
    for elem_id, value in {"cfg-train-max_steps": "20", "cfg-train-save_steps": "1000",
                           "cfg-train-per_device_train_batch_size": "2", "cfg-train-gradient_accumulation_steps": "1",
                           "cfg-kto-max_length": "128", "cfg-lora-r": "4", "cfg-lora-lora_alpha": "8"}.items():
        _set(page, elem_id, value)
    page.locator("#cfg-train-gradient_checkpointing input[type=checkbox]").uncheck()
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started run e2e")
    page.wait_for_function("() => /step ([2-9]|\\d\\d+) \\//.test(document.querySelector('#train-progress').innerText)",
                           timeout=TIMEOUT)
    expect(page.locator("#plot-loss [aria-roledescription='axis']").first).to_be_attached()
    shot(page, "e2e-3-train-running")
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=TIMEOUT)
    stopped_at = int(re.search(r"step (\d+) /", page.locator("#train-progress").inner_text()).group(1))
    assert (home / "runs" / "e2e" / "adapter" / "adapter_model.safetensors").is_file()
    run_cfg = (home / "runs" / "e2e" / "run.yaml").read_text()
    assert str(saved[0]) in run_cfg  # trained on the cleaned copy chosen in the Data tab
    _set(page, "cfg-train-max_steps", str(stopped_at + 2))
    page.locator("#train-resume").click()
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=TIMEOUT)
    expect(page.locator("#train-progress")).to_contain_text(f"step {stopped_at + 2} / {stopped_at + 2}")
    expect(page.locator("#train-stop")).to_be_disabled()  # no longer red once the run has ended
    shot(page, "e2e-4-train-finished")

    # 4. Chat: the same question to base and tuned, side by side; rate the tuned reply
    page.get_by_role("tab", name="Chat").click()
    # the run's adapter is there without pressing the refresh button: the list follows run ends
    expect(page.locator("#chat-adapter input")).to_have_value(re.compile(r"^e2e"), timeout=30_000)
    page.get_by_text("Prompt and sampling").click()
    box = page.locator("#chat-max-new input[type=number]")
    box.fill("12")
    box.press("Enter")
    page.locator("#chat-input textarea").fill(PAIRS[0][0])
    page.locator("#chat-send").click()
    expect(page.locator("#chat-base [data-testid=bot]").last).not_to_be_empty(timeout=180_000)
    _wait_until_reply_complete(page, "#chat-tuned")
    expect(page.locator("#chat-status")).to_contain_text("tuned side: e2e", timeout=180_000)
    page.locator("#chat-tuned").get_by_role("button", name="Like").last.click()
    expect(page.locator("#chat-feedback")).to_contain_text("1 rows so far", timeout=30_000)
    feedback = [json.loads(l) for l in (home / "data" / "feedback.jsonl").read_text().splitlines()]
    assert feedback[-1]["label"] is True and feedback[-1]["prompt"][0]["content"] == PAIRS[0][0]
    shot(page, "e2e-5-chat")

    # 5. Export the adapter; the studio loads it back to check it
    page.get_by_text("Export", exact=True).click()
    page.locator("#chat-export-run").click()
    expect(page.locator("#chat-export-result")).to_contain_text("adapter", timeout=180_000)
    expect(page.locator("#chat-export-result")).to_contain_text("loaded back")
    exported = list((home / "exports").glob("e2e-adapter/adapter_model.safetensors"))
    assert exported, list(home.rglob("*"))[:20]
    shot(page, "e2e-6-export")
