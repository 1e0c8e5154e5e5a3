"""Issue 18, point 8: with --auth the login page carries no API description and reset/cancel need the login;
serving beyond this machine without --auth warns at start; the Docker image runs as a non-root user."""
from __future__ import annotations

import http.cookiejar
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.browser.conftest import _free_port
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = _free_port()
    log = open(home / "server.log", "w")
    env = dict(os.environ, KTO_STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--auth", "ann:s3cret"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, (home / "server.log").read_text()
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _post(opener, url, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return opener.open(req, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_login_page_has_no_api_description_and_reset_cancel_need_the_login(auth_server):
    anon = urllib.request.build_opener()
    page = anon.open(auth_server + "/", timeout=30).read().decode()
    assert "window.gradio_api_info = null;" in page
    assert "named_endpoints" not in page and "/load" not in page
    assert _post(anon, auth_server + "/gradio_api/reset", {"event_id": "x"}) == 401
    assert _post(anon, auth_server + "/gradio_api/cancel", {"session_hash": "a", "fn_index": 0,
                                                           "event_id": "x"}) == 401
    # logged in, the studio works as before
    jar = http.cookiejar.CookieJar()
    user = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode()
    assert user.open(auth_server + "/login", data=form, timeout=30).status == 200
    page = user.open(auth_server + "/", timeout=30).read().decode()
    assert "named_endpoints" in page
    assert _post(user, auth_server + "/gradio_api/reset", {"event_id": "x"}) == 200


def test_serving_beyond_this_machine_without_auth_warns():
    import app

    for host, share in (("0.0.0.0", False), ("192.168.1.5", False), ("127.0.0.1", True)):
        assert "WARNING" in app.exposure_warning(host, share, False) and "--auth" in app.exposure_warning(
            host, share, False)
        assert app.exposure_warning(host, share, True) is None
    assert app.exposure_warning("127.0.0.1", False, False) is None
    assert app.exposure_warning("localhost", False, False) is None


def test_the_docker_image_runs_as_a_user_and_documents_auth():
    text = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must not start as root"
    assert "--auth" in text
