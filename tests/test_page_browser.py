"""The web page in headless Chromium: upload an image, see the result thumbnails, click one.

Chromium is driven over the DevTools protocol with a small websocket client,
so nothing but Debian's ``chromium`` package is needed (no browser download).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import serve_support as support

pytestmark = [pytest.mark.heavy, pytest.mark.browser]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
    "--remote-debugging-port=0",
)
WAIT_S = 30


def chromium_path() -> str:
    """The Chromium binary; its absence skips the test, except under CI where it fails."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium package is not installed (apt-get install -y --no-install-recommends chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands, waiting for events."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self._socket = connect(websocket_url, max_size=None, open_timeout=WAIT_S)
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=WAIT_S))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._events.append(message)

    def wait_event(self, method: str) -> dict[str, Any]:
        while True:
            for event in self._events:
                if event.get("method") == method:
                    self._events.remove(event)
                    return event
            self._events.append(json.loads(self._socket.recv(timeout=WAIT_S)))

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still false after {WAIT_S}s: {expression}")

    def close(self) -> None:
        self._socket.close()


@pytest.fixture(scope="module")
def page_url(tiny_dataset, tmp_path_factory) -> Iterator[tuple[str, support.Servable]]:
    servable = support.make_servable(tiny_dataset, tmp_path_factory.mktemp("page"))
    with support.running_app(support.small_config(servable, tiny_dataset, shards=2, app_name="hashray-page")) as url:
        yield url, servable


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = wait_for_devtools_port(profile / "DevToolsActivePort", process)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=WAIT_S).json()
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.close()
    finally:
        process.terminate()
        process.wait(timeout=WAIT_S)


def wait_for_devtools_port(port_file: Path, process: subprocess.Popen) -> int:
    """Chromium writes its DevTools port here once it listens (we asked for port 0)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with code {process.returncode}")
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def test_upload_shows_thumbnails_and_a_click_searches_again(page_url, browser: DevTools, tmp_path: Path) -> None:
    url, servable = page_url
    query = tmp_path / "query.jpg"
    query.write_bytes(servable.images[4])
    expected = httpx.post(f"{url}/search", params={"k": 12}, files={"image": query.read_bytes()}, timeout=30).json()

    browser.send("Page.enable")
    browser.send("Page.navigate", url=url + "/")
    browser.wait_event("Page.loadEventFired")
    document = browser.send("DOM.getDocument")
    file_input = browser.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
    browser.send("DOM.setFileInputFiles", files=[str(query)], nodeId=file_input["nodeId"])

    loaded = "[...document.querySelectorAll('#results .result img')]"
    browser.wait_for(f"{loaded}.length === 12 && {loaded}.every(i => i.complete && i.naturalWidth > 0)")
    shown = browser.evaluate("[...document.querySelectorAll('#results .result')].map(c => c.dataset.id)")
    assert shown == [r["id"] for r in expected["results"]]
    captions = browser.evaluate("[...document.querySelectorAll('#results .distance')].map(d => d.textContent)")
    assert captions == [f"distance {r['distance']}" for r in expected["results"]]
    assert browser.evaluate("document.querySelector('#results .labels').textContent") == ", ".join(
        expected["results"][0]["labels"]
    )
    assert "12 results" in browser.evaluate("document.getElementById('status').textContent")

    screenshot = tmp_path / "page.png"
    screenshot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    assert screenshot.stat().st_size > 10_000, "the screenshot is (nearly) blank"
    print(f"screenshot: {screenshot}")

    assert_click_searches(browser, url, shown[5])


def assert_click_searches(browser: DevTools, url: str, clicked: str) -> None:
    """Clicking the result ``clicked`` shows what ``GET /search/{clicked}`` answers, in its order."""
    browser.evaluate(f"document.querySelector('#results .result[data-id=\"{clicked}\"]').click()")
    browser.wait_for(f"document.getElementById('status').textContent.includes('query item {clicked}')")
    by_id = httpx.get(f"{url}/search/{clicked}", params={"k": 12}, timeout=30).json()
    shown = browser.evaluate("[...document.querySelectorAll('#results .result')].map(c => c.dataset.id)")
    assert shown == [r["id"] for r in by_id["results"]]


def test_a_first_visit_shows_a_sample_and_a_click_searches(page_url, browser: DevTools) -> None:
    url, servable = page_url
    sample = httpx.get(f"{url}/sample", params={"n": 24}, timeout=30).json()
    assert sample["count"] == len(servable.ids) and len(sample["results"]) == 24

    browser.send("Page.enable")
    browser.send("Page.navigate", url=url + "/")
    browser.wait_event("Page.loadEventFired")
    loaded = "[...document.querySelectorAll('#results .result img')]"
    browser.wait_for(f"{loaded}.length === 24 && {loaded}.every(i => i.complete && i.naturalWidth > 0)")
    shown = browser.evaluate("[...document.querySelectorAll('#results .result')].map(c => c.dataset.id)")
    assert shown == [r["id"] for r in sample["results"]]
    labels = browser.evaluate("[...document.querySelectorAll('#results .labels')].map(d => d.textContent)")
    assert labels == [", ".join(r["labels"]) for r in sample["results"]]
    assert "click one to search" in browser.evaluate("document.getElementById('status').textContent")

    assert_click_searches(browser, url, shown[3])
