"""Issue 27, item 3 in the browser: the export offers every format and GGUF type, says how big the file will be
before it is written, and offers what it wrote for download, so a studio running on another machine is usable."""
from __future__ import annotations

import io
import zipfile

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import serve_with_trained_run, shot


@pytest.fixture()
def studio_server(tmp_path, tmp_path_factory, bundled_model_dir):
    with serve_with_trained_run(tmp_path, tmp_path_factory) as server:
        yield server


def _download(page, link) -> bytes:
    href = link.get_attribute("href")
    response = page.request.get(href if href.startswith("http") else page.url.rstrip("/") + href)
    assert response.ok, response.status
    return response.body()


def test_export_shows_the_size_first_and_offers_a_download(page, studio_server):
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-adapter input")).to_have_value("tiny · final adapter")
    page.get_by_text("Export", exact=True).click()

    # the GGUF type appears with the GGUF format, and the size shows before anything is written
    fmt = page.locator("#chat-export-format")
    for name in ("adapter", "merged", "gguf", "gguf-adapter"):
        expect(fmt.get_by_label(name, exact=True)).to_be_visible()
    fmt.get_by_label("gguf", exact=True).check()
    expect(page.locator("#chat-export-gguf-type")).to_be_visible()
    expect(page.locator("#chat-export-size")).to_contain_text("MB: GGUF q", timeout=120_000)
    assert not (studio_server["home"] / "exports").exists() or not any((studio_server["home"] / "exports").iterdir())
    fmt.get_by_label("gguf-adapter", exact=True).check()
    expect(page.locator("#chat-export-gguf-type")).to_be_hidden()
    expect(page.locator("#chat-export-size")).to_contain_text("GGUF LoRA adapter", timeout=120_000)

    # the LoRA as a GGUF adapter: the file and its Modelfile are offered for download
    page.locator("#chat-export-run").click()
    result = page.locator("#chat-export-result")
    expect(result).to_contain_text("gguf-adapter", timeout=300_000)
    expect(result).to_contain_text("loaded back")
    links = page.locator("#chat-export-download a")
    expect(links).to_have_count(2, timeout=60_000)
    hrefs = [links.nth(i).get_attribute("href") for i in range(2)]
    assert sorted(h.rsplit("/", 1)[-1] for h in hrefs) == ["Modelfile", "tiny-lora-F16.gguf"], hrefs
    folder = studio_server["home"] / "exports" / "tiny-gguf-adapter"
    for i, href in enumerate(hrefs):
        assert _download(page, links.nth(i)) == (folder / href.rsplit("/", 1)[-1]).read_bytes()
    shot(page, "export-download-gguf-adapter")

    # a folder export comes as one zip
    fmt.get_by_label("adapter", exact=True).check()
    page.locator("#chat-export-run").click()
    expect(result).not_to_contain_text("tiny-gguf-adapter", timeout=300_000)
    expect(result).to_contain_text("exports/tiny-adapter")
    expect(links).to_have_count(1, timeout=60_000)
    archive = zipfile.ZipFile(io.BytesIO(_download(page, links.first)))
    assert "tiny-adapter/adapter_model.safetensors" in archive.namelist()
    assert archive.read("tiny-adapter/adapter_model.safetensors") == (
        studio_server["home"] / "exports" / "tiny-adapter" / "adapter_model.safetensors").read_bytes()
    shot(page, "export-download-adapter")
