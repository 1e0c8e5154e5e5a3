"""The studio loads in a real browser and shows its four tabs."""
from tests.browser.conftest import shot


def test_app_shows_four_tabs(page):
    for tab in ["Data", "Model & preset", "Train", "Chat"]:
        assert page.get_by_role("tab", name=tab).is_visible(), f"tab {tab!r} missing"
    page.get_by_role("tab", name="Train").click()
    assert page.get_by_role("button", name="Start training").is_visible()
    shot(page, "smoke-train-tab")
