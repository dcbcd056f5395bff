"""
The web client (C{cim/route/web/}, served by the route at C{/}) in a real
browser: Debian's C{chromium}, driven by playwright's Python API pointed at
it (no browser download), against real C{twistd} processes.

C{make test} installs the browser when it is missing
(C{scripts/services.sh}); run alone, these tests are skipped with that
reason when it is not there.  Each test takes a few seconds; the first
saves C{docs/web-client.png}, the screenshot README shows.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cim.route.fields import REQUESTS
from tests.kit.cluster import ROOT, Daemon, Processes

pytestmark = pytest.mark.integration

#: Debian's browser (package chromium).
CHROMIUM = os.environ.get("CIM_TEST_CHROMIUM", "/usr/bin/chromium")
#: As root in a sandboxed machine with no network beyond loopback: no
#: sandbox, no GPU, nothing that phones home (it would be refused, many
#: times a second).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOT = ROOT / "docs" / "web-client.png"
#: How long the page may take to show what a step expects, in milliseconds.
WAIT = 15_000

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - make install installs it
    sync_playwright = None  # type: ignore[assignment]


#: Issue 14 (devices, two-sided conversations): the page logs in as a
#: device and reads /conversations; before it, this tree's route fails
#: logins (its store is issue 14's already).
ISSUE_14 = "/conversations" in REQUESTS
needs_issue_14 = pytest.mark.skipif(
    not ISSUE_14, reason="needs issue 14 (devices, /conversations) merged into main"
)


# Fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.skip("playwright is not installed (make install installs it)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    A C{twistd -n cim-standalone} (route and server in one process, memory
    store), on free ports.
    """
    directory = tmp_path_factory.mktemp("web")
    processes = Processes(directory)
    daemon = Daemon("standalone", "cim-standalone", [], directory, processes)
    try:
        daemon.start()
        daemon.wait_ready_blocking()
        yield daemon
    finally:
        processes.stop_all()


class Tab:
    """
    One browser page (its own context: its own local storage, so its own
    device and login) on the web client.
    """

    def __init__(self, browser: Browser, url: str, phone: bool = False) -> None:
        width, height = (390, 780) if phone else (1100, 700)
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page: Page = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.goto(url)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def log_in(self, name: str, password: str = "secret-password") -> None:
        page = self.page
        page.fill("#login-name", name)
        page.fill("#login-password", password)
        page.press("#login-password", "Enter")
        expect(page.locator("#me")).to_have_text(name, timeout=WAIT)

    def open(self, title: str) -> None:
        self.page.locator("#conversations button", has_text=title).click()
        expect(self.page.locator("#chat-title")).to_have_text(title, timeout=WAIT)

    def texts(self) -> list[str]:
        return self.page.locator("#messages .msg .text").all_text_contents()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser: Browser) -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        assert not tab.errors, tab.errors
        tab.close()


def api(url: str, path: str, body: dict[str, Any], token: str = "") -> Any:
    """
    Call the route as cim's clients do; @return: C{dataBody}.
    """
    headers = {"Content-Type": "application/json", "X-Cim-Extended": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["code"] == "9000", answer
    return answer["dataBody"]


def account(url: str, name: str, password: str = "pw-" + "x" * 8) -> dict[str, Any]:
    """
    Register C{name} and log in over HTTP: @return: the login reply.
    """
    who = api(url, "/registerAccount", {"userName": name, "password": password})
    reply: dict[str, Any] = api(
        url, "/login", {**who, "password": password, "device": "http"}
    )
    return reply


# The files


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_files_are_served_with_a_strict_policy(node: Daemon) -> None:
    url = node.url("route")
    status, headers, body = get(url + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'<script type="module" src="/app.js">' in body
    # No inline script or style, no inline event handler.
    assert body.count(b"<script") == 1 and b"<style" not in body
    assert re.search(rb"<[^>]*\son[a-z]+\s*=", body) is None
    for path, kind in [
        ("/app.js", "text/javascript"),
        ("/chat.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/emoji.json", "application/json"),
    ]:
        status, headers, body = get(url + path)
        assert status == 200 and headers["Content-Type"].startswith(kind), path
    emoji = json.loads(get(url + "/emoji.json")[2])
    from cim.client.emoji import EMOJI

    assert emoji == EMOJI


def test_the_api_is_unchanged_around_the_page(node: Daemon) -> None:
    url = node.url("route")
    status, headers, body = get(url + "/no-such-page")
    assert status == 404 and json.loads(body)["code"] == "3000"
    status, _, body = get(url + "/login")
    assert status == 405 and json.loads(body)["code"] == "3000"
    status, _, body = get(url + "/health")
    assert status == 200 and json.loads(body)["code"] == "9000"
    # A POST to a file's path is the API's (which has no such endpoint).
    request = urllib.request.Request(url + "/app.js", b"{}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code in (404, 405)
    else:  # pragma: no cover
        raise AssertionError("POST /app.js was answered")


# The page


@needs_issue_14
def test_register_log_in_and_stay_logged_in(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    url = node.url("route") + "/"
    tab = Tab(browser, url)
    tabs.append(tab)
    page = tab.page
    expect(page.locator("#login-name")).to_be_focused()
    # Keyboard alone: type, Tab, type, Enter.
    page.keyboard.type("webalice")
    page.keyboard.press("Tab")
    page.keyboard.type("alice-password")
    page.keyboard.press("Enter")
    expect(page.locator("#me")).to_have_text("webalice", timeout=WAIT)
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account'))")
    assert stored["userName"] == "webalice" and stored["token"]
    device = page.evaluate("() => localStorage.getItem('cim.device')")
    assert device.startswith("web-")
    # A reload stays logged in, as the same device.
    page.reload()
    expect(page.locator("#me")).to_have_text("webalice", timeout=WAIT)
    expect(page.locator("#login")).to_be_hidden()
    assert page.evaluate("() => localStorage.getItem('cim.device')") == device
    # A wrong password is refused with a message, on a page of its own.
    other = Tab(browser, url)
    tabs.append(other)
    other.page.fill("#login-name", "webalice")
    other.page.fill("#login-password", "not-her-password")
    other.page.press("#login-password", "Enter")
    expect(other.page.locator("#login-error")).to_contain_text("taken", timeout=WAIT)


@needs_issue_14
def test_html_looking_text_is_shown_as_text(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    url = node.url("route")
    tab = Tab(browser, url + "/")
    tabs.append(tab)
    tab.log_in("webcarol")
    page = tab.page
    page.fill("#group-id", "markup")
    page.click("#group-create")
    expect(page.locator("#chat-title")).to_have_text("# markup", timeout=WAIT)
    # Another member sends markup and an emoji alias over HTTP.
    dave = account(url, "webdave")
    api(
        url,
        "/group/join",
        {"userId": dave["userId"], "groupId": "markup"},
        dave["token"],
    )
    hostile = "<img src=x onerror=alert(1)>"
    for text in (hostile, "<b>bold</b> :smile:"):
        api(
            url,
            "/group/send",
            {"userId": dave["userId"], "groupId": "markup", "msg": text},
            dave["token"],
        )
    # Live over the WebSocket, or from the history after a reload.
    page.reload()
    tab.open("# markup")
    messages = page.locator("#messages .msg .text")
    expect(messages).to_have_text([hostile, "<b>bold</b> 😄"], timeout=WAIT)
    assert page.locator("#messages img, #messages b").count() == 0
    assert not tab.dialogs
