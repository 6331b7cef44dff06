"""The playground page in a real headless Chromium, against `serve` on loopback with the real model:
move a strength slider, send a prompt, both replies stream in and differ; nothing loads from
anywhere but the server; a server error shows in the page.

Needs Debian's `chromium` (.ci/run installs it) and the `playwright` package from the [dev] extra
(it drives the system browser; no browser download)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="the [dev] extra installs playwright")

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
# set to a folder (e.g. docs) to keep the screenshot the README shows
SCREENSHOT_DIR = os.environ.get("INNSTEER_SCREENSHOT_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "playground-key-42"


@contextlib.contextmanager
def serve(*extra: str):
    cli = Path(sys.executable).with_name("innsteer-local")
    port = free_port()
    proc = subprocess.Popen([str(cli if cli.exists() else "innsteer-local"), "serve", "--flow", "honesty.gguf",
                             "--flow", "positivity.gguf", "--port", str(port), "--n-ctx", "1024", "--threads", "2",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "serve did not come up"
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def served():
    with serve() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=BROWSER, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(served, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.requested = []  # every URL the page asked for
    p.on("request", lambda r: p.requested.append(r.url))
    p.bodies = []  # the JSON bodies it posted
    p.on("request", lambda r: p.bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    p.console_errors = []
    p.on("pageerror", lambda e: p.console_errors.append(str(e)))
    p.goto(served + "/")
    p.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield p
    context.close()


def test_slider_prompt_and_two_streamed_replies(page, served, tmp_path):
    honesty = page.locator("fieldset[data-flow=honesty]")
    assert honesty.locator("input[type=checkbox]").is_checked()
    slider = honesty.locator("input[type=range]")
    start = float(slider.input_value())
    slider.focus()
    for _ in range(10):  # keyboard only: ten steps of 0.1 to the right
        page.keyboard.press("ArrowRight")
    moved = float(honesty.locator("input[type=number]").input_value())
    assert moved == pytest.approx(start + 1.0, abs=1e-6)
    assert f"honesty@{moved:g}" in page.locator("#model-id").inner_text()
    assert f'"strength": {moved:g}' in page.locator("#snippet-python").inner_text().replace('":', '": ')

    page.locator("#max-tokens").fill("40")
    page.locator("#prompt").fill("I lost my friend's book. What should I tell her?")
    page.locator("#prompt").focus()
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#pane-plain[data-state=done]", timeout=120_000)
    page.wait_for_selector("#pane-steered[data-state=done]", timeout=120_000)
    plain = page.locator("#pane-plain .text").inner_text().strip()
    steered = page.locator("#pane-steered .text").inner_text().strip()
    assert plain and steered and plain != steered
    stats = page.locator("#pane-steered .stats").inner_text()
    assert "rows steered" in stats and "rows steered / token\n1" in stats
    assert "rows steered\n0" in page.locator("#pane-plain .stats").inner_text()

    # the page sent the slider's steering, and the snippet is that request; sent alone it steers
    # the same way (its text may part from the batched one: llama.cpp is not batch-invariant)
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "I lost my friend's book. What should "
                                                                                "I tell her?"}],
            "max_tokens": 40, "temperature": 0, "seed": 0, "steering": [{"flow": "honesty", "strength": moved,
                                                                          "gate": "off"}]}
    sent = [b for b in page.bodies if b.get("steering")]
    assert len(sent) == 1 and {k: sent[0][k] for k in body} == body
    again = httpx.post(f"{served}/v1/chat/completions", json=body, timeout=120).json()
    assert again["steering_stats"]["rows_steered_per_token"] == 1.0
    print("steered reply alone identical to the batched one:", again["choices"][0]["message"]["content"].strip() == steered)

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT_DIR:
        shutil.copy(shot, Path(SCREENSHOT_DIR) / "playground.png")
    outside = [u for u in page.requested if not u.startswith(served)]
    assert not outside, f"the page loaded from outside the server: {outside}"
    assert not page.console_errors


def test_server_errors_show_in_the_page(page):
    page.locator("#max-tokens").fill("0")
    page.locator("#send").click()
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    assert "400" in error.inner_text() and "max_tokens" in error.inner_text()
    page.locator("#max-tokens").fill("40")
    page.locator("#prompt").fill("   ")
    page.locator("#send").click()
    assert "Write a prompt first" in error.inner_text()


def test_the_page_asks_for_the_api_key_and_sends_it(browser):
    with serve("--api-key", KEY) as url:
        context = browser.new_context()
        p = context.new_page()
        auth = []
        p.on("request", lambda r: auth.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        p.goto(url + "/")
        p.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
        assert "API key" in p.locator("#key-message").inner_text()
        p.locator("#api-key").fill("wrong-key-000")
        p.locator("#key-form button").click()
        p.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
        assert "refused" in p.locator("#key-message").inner_text()
        p.locator("#api-key").fill(KEY)
        p.locator("#key-form button").click()
        p.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert p.locator("fieldset[data-flow=honesty]").count() == 1
        assert "$INNSTEER_API_KEY" in p.locator("#snippet-curl").inner_text()
        assert KEY not in p.locator("#snippet-curl").inner_text() + p.locator("#snippet-python").inner_text()
        p.locator("#max-tokens").fill("8")
        p.locator("#send").click()
        p.wait_for_selector("#pane-steered[data-state=done]", timeout=120_000)
        assert auth[-1] == f"Bearer {KEY}" and f"Bearer {KEY}" in auth
        context.close()
