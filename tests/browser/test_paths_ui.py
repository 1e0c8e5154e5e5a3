"""Issue 18, points 2-3 in the browser: the web UI reads data only from its allow-list and exports only under the
studio home; a refused path is said plainly and nothing of the file is shown."""
from __future__ import annotations

import os

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import shot


@pytest.fixture()
def studio_server(tmp_path):
    """The studio with a run that has an adapter folder (enough to reach the export's target check)."""
    from tests.browser.conftest import serve_studio

    home = tmp_path / "home"
    run = home / "runs" / "fake"
    (run / "adapter").mkdir(parents=True)
    (run / "run.yaml").write_text("name: fake\n")
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with serve_studio(home, tmp_path / "server.log") as server:
        yield server


def test_the_data_box_does_not_read_files_outside_the_allow_list(page, studio_server, tmp_path):
    secret = tmp_path / "elsewhere" / "creds.csv"
    secret.parent.mkdir()
    secret.write_text("username,password\nroot,hunter2\n")
    page.get_by_role("tab", name="Data").click()
    for typed in (str(secret), "../" * 15 + str(secret).lstrip("/")):
        box = page.locator("#data-path textarea, #data-path input").first
        box.fill(typed)
        page.locator("#data-load").click()
        summary = page.locator("#data-summary")
        expect(summary).to_contain_text("the web UI only reads files in the studio home", timeout=180_000)
        expect(summary).to_contain_text("--allow-path")
        assert "hunter2" not in page.content() and "password" not in summary.inner_text()
    shot(page, "paths-data-refused")


def test_an_export_outside_the_studio_home_is_refused(page, studio_server):
    target = "/etc/cron.d/kto-studio-test"
    page.get_by_role("tab", name="Chat").click()
    page.get_by_text("Export", exact=True).click()
    expect(page.locator("#chat-export-overwrite")).to_contain_text("Replace an earlier export there")
    page.locator("#chat-export-out textarea, #chat-export-out input").first.fill(target)
    page.locator("#chat-export-run").click()
    result = page.locator("#chat-export-result")
    expect(result).to_contain_text("Export failed: the web UI exports only into the studio home", timeout=180_000)
    assert not os.path.exists(target)
    shot(page, "paths-export-refused")
