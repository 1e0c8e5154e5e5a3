"""What a visitor who has not logged in gets from a studio started with ``--auth``.

Gradio 6 checks the login on its API routes, but its page template embeds the whole API description
(``window.gradio_api_info``: every endpoint and its parameters) into the login page too, and its ``/reset`` and
``/cancel`` routes answer anyone. This ASGI middleware (installed through ``launch(app_kwargs=...)``) closes both for
visitors without a valid login cookie: pages get ``window.gradio_api_info = null`` (the logged-in page fetches the
description from ``/gradio_api/info``, which needs the login), and reset/cancel answer 401. Without ``--auth`` it
passes everything through.
"""
from __future__ import annotations

import re
from http.cookies import SimpleCookie

API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*.*?;\s*</script>", re.S)
LOCKED = ("/reset", "/reset/", "/cancel", "/cancel/")


class LoginGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gapp = scope.get("app")
        if gapp is None or getattr(gapp, "auth", None) is None:  # no --auth: nothing to guard
            return await self.app(scope, receive, send)
        if await self._logged_in(gapp, scope):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if scope.get("method") == "POST" and "/gradio_api/" in path and path.endswith(LOCKED):
            body = b'{"detail":{"error":"Not authenticated"}}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope.get("method") != "GET" or "/gradio_api/" in path:
            return await self.app(scope, receive, send)
        return await self._without_api_info(scope, receive, send)

    @staticmethod
    async def _logged_in(gapp, scope) -> bool:
        raw = b"; ".join(v for k, v in scope.get("headers", []) if k == b"cookie").decode("latin-1")
        cookies = SimpleCookie()
        try:
            cookies.load(raw)
        except Exception:
            return False
        cid = getattr(gapp, "cookie_id", "")
        for name in (f"access-token-{cid}", f"access-token-unsecure-{cid}"):
            if name in cookies and gapp.tokens.get(cookies[name].value) is not None:
                return True
        return False

    async def _without_api_info(self, scope, receive, send):
        start: dict = {}
        chunks: list[bytes] = []
        html = False

        async def capture(message):
            nonlocal html
            if message["type"] == "http.response.start":
                start.update(message)
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                html = ctype.startswith(b"text/html")
                if not html:
                    await send(message)
                return
            if not html:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = API_INFO.sub(b"window.gradio_api_info = null;</script>", b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


# ---- what the page may load and where its forms may send (issue 28, case 4) ---------------------------------------
# User text is shown escaped (studio.ui.inert); the policy makes sure that even text that slipped through cannot
# fetch a remote image (tracking) or submit a form to another host (phishing). Scripts, styles, fonts and
# connections are left to Gradio (its page and themes need inline scripts and web fonts).
CONTENT_SECURITY_POLICY = ("img-src 'self' data: blob:; media-src 'self' data: blob:; form-action 'self'; "
                           "object-src 'none'; base-uri 'self'; frame-ancestors 'self'")


class SecurityHeaders:
    """ASGI middleware: every HTTP response carries the Content-Security-Policy above (and nosniff)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"content-security-policy", b"x-content-type-options")]
                headers += [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                            (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_headers)
