"""User text shown inert (issue 28, case 4), without a browser: what the Chatbots and the Data tab's row view are
given holds no live HTML or image, and the chat turns shown go back to the model exactly as they were said."""
from __future__ import annotations

import re

from studio.ui import inert

FORM = '<form action="http://other.invalid/phish"><input name="pw"></form>'
IMAGE = "![i](http://other.invalid/track.png)"


def test_chat_messages_are_escaped_for_the_chatbot_and_come_back_as_said():
    from studio.ui.chat_tab import _plain

    said = [{"role": "user", "content": f"log me in {FORM} {IMAGE} a\\b *x*"},
            {"role": "assistant", "content": f"**Sure**:\n```html\n{FORM}\n```\n{FORM} {IMAGE} `<b>`"}]
    shown = inert.shown(said)
    user, reply = shown[0]["content"], shown[1]["content"]
    assert "<form" not in user.replace("\\<form", "") and "![" not in user.replace("\\!\\[", "")
    assert "\\<form" in reply and "\\![i]" in reply  # raw HTML and images escaped outside code
    assert f"```html\n{FORM}\n```" in reply and "`<b>`" in reply and "**Sure**" in reply  # Markdown kept
    assert _plain(shown) == said


def test_the_data_tabs_row_view_shows_markup_as_text():
    from studio.ui.data_tab import row_md

    class WB:
        rows = [{"prompt": IMAGE, "completion": FORM, "label": True}]
        lengths = None

        class norm:
            sources = [1]

        class report:
            @staticmethod
            def problems():
                return []

        @staticmethod
        def issues_by_row():
            return {}

    md = row_md(WB, 1)
    assert not re.search(r"(?<!\\)<", md) and "![" not in md  # every < escaped, no image syntax left
    assert inert.text(FORM) in md and inert.text(IMAGE) in md
