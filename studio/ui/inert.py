"""User text shown inert: data rows, chat messages, prompts and votes come from files and people the studio does not
control, and Gradio renders Markdown and (sanitized) HTML, which keeps ``<form>`` and remote ``<img>``: a downloaded
data set could show a working login form or make the browser fetch a tracking image as soon as a row is viewed.

- ``text(s)``: any user text as literal text in Markdown: every ASCII punctuation character is backslash-escaped, so
  no HTML, link, image or emphasis is made of it (what the user sees is the text itself). ``untext`` undoes it.
- ``reply(s)``: a model's reply keeps its Markdown (lists, code, emphasis, links) but no raw HTML and no images:
  outside code, ``\\``, ``<``, ``>`` and the ``!`` of ``![`` are escaped. ``unreply`` undoes it exactly.

The Chatbot holds the shown form; ``chat_tab._plain`` turns it back into what was said before it goes to the model.
The Content-Security-Policy (``studio.ui.guard.SecurityHeaders``) forbids remote images and form actions too.
"""
from __future__ import annotations

import re

_PUNCT = r"""!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~"""
_ANY = re.compile(f"([{_PUNCT}])")
_ANY_BACK = re.compile(f"\\\\([{_PUNCT}])")
# code spans and fenced blocks (an unclosed fence runs to the end: a reply still being written)
_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`)", re.S)
_REPLY = re.compile(r"([\\<>]|!(?=\[))")
_REPLY_BACK = re.compile(r"\\([\\<>]|!(?=\[))")


def text(s) -> str:
    """User text (a data row's prompt or completion, a chat message, a prompt) as literal text in Markdown."""
    return _ANY.sub(r"\\\1", "" if s is None else str(s))


def untext(s: str) -> str:
    return _ANY_BACK.sub(r"\1", s)


def _outside_code(s: str, fn) -> str:
    parts = _CODE.split(s)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def reply(s) -> str:
    """A model's reply: its Markdown, without raw HTML or images."""
    return _outside_code("" if s is None else str(s), lambda p: _REPLY.sub(r"\\\1", p))


def unreply(s: str) -> str:
    return _outside_code(s, lambda p: _REPLY_BACK.sub(r"\1", p))


def _map_contents(messages: list[dict], assistant, user) -> list[dict]:
    """Copies of ``messages`` with each text content passed through ``assistant`` or ``user`` by its role."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            m = {**m, "content": assistant(content) if m.get("role") == "assistant" else user(content)}
        out.append(m)
    return out


def shown(messages: list[dict]) -> list[dict]:
    """Chat messages as a Chatbot shows them: the user's as literal text, the model's as sanitized Markdown."""
    return _map_contents(messages, reply, text)


def said(messages: list[dict]) -> list[dict]:
    """The inverse of ``shown``: what was said, from what a Chatbot shows."""
    return _map_contents(messages, unreply, untext)
