"""The demo page in headless Chromium: start a session, press keys, frames arrive and change."""

import json
import secrets
import shutil

import pytest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def test_demo_page_streams_and_follows_keys(make_server, tmp_path):
    """With an API key configured: the page sends it on fetches and on the WebSocket, never in a URL."""
    from playwright.sync_api import sync_playwright

    key = "demo-" + secrets.token_urlsafe(12)
    server = make_server(api_keys=json.dumps([key]))

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#key", key)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelector('#model').options.length >= 2")
            page.click("#start")
            page.wait_for_function("Number(document.body.dataset.frames || 0) >= 6", timeout=30_000)
            before = page.evaluate("document.getElementById('screen').toDataURL()")
            page.keyboard.down("ArrowRight")
            page.wait_for_function("document.getElementById('action').textContent === 'right'")
            shown = int(page.evaluate("document.body.dataset.frames"))
            page.wait_for_function(f"Number(document.body.dataset.frames) >= {shown + 6}", timeout=30_000)
            page.keyboard.up("ArrowRight")
            after = page.evaluate("document.getElementById('screen').toDataURL()")
            page.wait_for_function("document.getElementById('fps').textContent !== '–'", timeout=10_000)
            page.screenshot(path=str(tmp_path / "demo.png"))
            page.click("#stop")
            page.wait_for_function("document.getElementById('log').textContent.includes('ended')")
        finally:
            browser.close()
    assert before != after and not errors
    assert (tmp_path / "demo.png").stat().st_size > 5000
    server.stop()
    assert "/v1/stream" in server.output() and key not in server.output()
