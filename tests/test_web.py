"""
The web client (C{cim/route/web/}, served by the route at C{/}) in a real
browser: Debian's C{chromium}, driven by playwright's Python API pointed at
it (no browser download), against real C{twistd} processes.

C{make test} installs the browser when it is missing
(C{scripts/services.sh}); run alone, these tests are skipped with that
reason when it is not there (in CI, where C{CI} is set, they fail).  Each test takes a few seconds.  The first
takes a screenshot of the chat; it refreshes C{docs/web-client.png}, the
screenshot README shows, only when C{CIM_WEB_SCREENSHOT} names that file
(C{make screenshot}), so that a test run leaves the tree as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cim.devcerts import make_dev_certs
from cim.route.fields import REQUESTS
from tests.kit.cluster import ROOT, Cluster, Daemon, Processes
from tests.kit.services import RedisServer

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
SECRET = "web-cluster-secret"
#: How long the page may take to show what a step expects, in milliseconds.
WAIT = 15_000

try:
    from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
except ImportError:  # pragma: no cover - make install installs it
    sync_playwright = None  # type: ignore[assignment]


#: Issue 14 (devices, two-sided conversations): the page logs in as a
#: device and reads /conversations; before it, this tree's route fails
#: logins (its store is issue 14's already).
ISSUE_14 = "/conversations" in REQUESTS
needs_issue_14 = pytest.mark.skipif(
    not ISSUE_14, reason="needs issue 14 (devices, /conversations) merged into main"
)

#: The WebSocket gateway (issue 16) on every server, and the route's login
#: reply naming it.
GATEWAY = ISSUE_14 and (ROOT / "cim" / "server" / "websocket.py").exists()
needs_gateway = pytest.mark.skipif(
    not GATEWAY, reason="needs the WebSocket gateway (issue 16) merged into main"
)


# Fixtures


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """
    Playwright (one per module: its sync API runs an event loop of its own).
    """
    missing = None
    if sync_playwright is None:
        missing = "playwright is not installed (make install installs it)"
    elif not os.access(CHROMIUM, os.X_OK):
        missing = f"{CHROMIUM} is missing (make test installs Debian's chromium)"
    if missing:
        # As with Redis and ZooKeeper: skipped when run alone, an error in CI.
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as running:
        yield running


def launch(playwright: Playwright, *args: str) -> Browser:
    """
    Debian's chromium, headless, with the flags this machine needs.
    """
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, *args]
    )


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    launched = launch(playwright)
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
        #: The URLs of the WebSockets the page opened.
        self.sockets: list[str] = []
        self.page.on("websocket", lambda ws: self.sockets.append(ws.url))
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


def api(
    url: str, path: str, body: dict[str, Any], token: str = "", secret: str = ""
) -> Any:
    """
    Call the route as cim's clients do (or with the cluster secret, as a
    back-end); @return: C{dataBody}.
    """
    headers = {"Content-Type": "application/json", "X-Cim-Extended": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if secret:
        headers["X-Cim-Secret"] = secret
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["code"] == "9000", answer
    return answer["dataBody"]


def answer(url: str, path: str, body: dict[str, Any]) -> Any:
    """
    Call the route as cim's clients do; @return: the whole envelope.
    """
    headers = {"Content-Type": "application/json", "X-Cim-Extended": "1"}
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def storage(page: Page) -> str:
    """
    Everything the page keeps in its local and session storage.
    """
    kept: str = page.evaluate(
        "() => JSON.stringify([{...localStorage}, {...sessionStorage}])"
    )
    return kept


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
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account'))")
    assert stored["userName"] == "webalice" and stored["token"]
    assert len(stored["deviceKey"]) >= 43
    device = page.evaluate("() => localStorage.getItem('cim.device')")
    assert device.startswith("web-")
    # The password is kept nowhere: the device key logs the page in again.
    assert "alice-password" not in storage(page)
    # A reload stays logged in, as the same device, with no password stored:
    # the device key was used (and replaced by a new one).
    page.reload()
    expect(page.locator("#me")).to_have_text("webalice", timeout=WAIT)
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    assert page.evaluate("() => localStorage.getItem('cim.device')") == device
    again = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account'))")
    assert again["deviceKey"] and again["deviceKey"] != stored["deviceKey"]
    assert "alice-password" not in storage(page)
    used = {
        "userId": stored["userId"],
        "userName": "webalice",
        "device": device,
        "deviceKey": stored["deviceKey"],
    }
    assert answer(node.url("route"), "/login", used)["code"] == "9100"
    # Log out forgets the device key, here and at the route.
    page.click("#logout")
    expect(page.locator("#login-name")).to_be_visible(timeout=WAIT)
    assert page.evaluate("() => localStorage.getItem('cim.account')") is None
    forgotten = {**used, "deviceKey": again["deviceKey"]}
    assert answer(node.url("route"), "/login", forgotten)["code"] == "9100"
    page.reload()
    expect(page.locator("#login-name")).to_be_visible(timeout=WAIT)
    tab.log_in("webalice", "alice-password")
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
    # A name is text too: a user named like markup writes privately.
    named = account(url, "<img src=y onerror=alert(2)>")
    me = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account')).userId")
    api(
        url,
        "/p2pRoute",
        {"userId": named["userId"], "receiveUserId": me, "msg": "hi"},
        named["token"],
    )
    page.reload()
    tab.open("<img src=y onerror=alert(2)>")
    expect(page.locator("#messages .sender")).to_have_text(
        ["<img src=y onerror=alert(2)>"], timeout=WAIT
    )
    assert page.locator("img, b").count() == 0
    assert not tab.dialogs


# Live chat: the WebSocket gateway


class Peer:
    """
    A library client in a process of its own (L{tests.kit.peer}).
    """

    def __init__(self, processes: Processes, url: str, name: str, log: Path) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.messages: list[dict[str, Any]] = []
        self.process = processes.spawn(
            f"peer-{name}",
            [sys.executable, "-m", "tests.kit.peer", url, name, "peer-password"],
            log,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.user_id = int(self.next("ready")["ready"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def next(self, kind: str, timeout: float = WAIT / 1000) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} from the peer in {timeout}s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if "message" in event:
                self.messages.append(event["message"])
            if kind in event:
                return event

    def received(self, text: str) -> list[str]:
        """
        Wait until a message C{text} arrived; @return: every text received
        (its own messages included: every device gets them).
        """
        while text not in (texts := [m["msg"] for m in self.messages]):
            self.next("message")
        return texts

    def command(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def send(self, user_id: int, text: str) -> None:
        self.command(private=user_id, text=text)
        self.next("acked")


@pytest.fixture
def peers(node: Daemon, tmp_path: Path) -> Iterator[Any]:
    processes = Processes(tmp_path)

    def start(name: str) -> Peer:
        return Peer(processes, node.url("route"), name, tmp_path / f"{name}.log")

    yield start
    processes.stop_all()


def states(tab: Tab) -> list[str]:
    return tab.page.locator("#messages .msg.mine").evaluate_all(
        "items => items.map(i => i.dataset.state)"
    )


@needs_gateway
def test_two_pages_chat_privately_and_in_a_group(
    browser: Browser, node: Daemon, tabs: list[Tab], tmp_path: Path
) -> None:
    url = node.url("route") + "/"
    bob = Tab(browser, url, phone=True)
    tabs.append(bob)
    bob.log_in("webbob")
    alice = Tab(browser, url)
    tabs.append(alice)
    alice.log_in("webann")
    a, b = alice.page, bob.page
    expect(a.locator("#status")).to_have_text("online", timeout=WAIT)
    # Ann starts the conversation from the online list.
    a.locator("#online button", has_text="webbob").click()
    expect(a.locator("#chat-title")).to_have_text("webbob")
    a.fill("#compose-text", "hi bob :wave:")
    a.press("#compose-text", "Enter")
    expect(a.locator("#messages .msg.mine .text")).to_have_text(["hi bob 👋"])
    expect(a.locator("#messages .msg.mine")).to_have_attribute(
        "data-state", "stored", timeout=WAIT
    )
    # Bob (phone width) sees an unread count, opens the conversation with
    # the keyboard, reads, and answers.
    badge = b.locator("#conversations button", has_text="webann").locator(".badge")
    expect(badge).to_have_text("1", timeout=WAIT)
    b.locator("#conversations button", has_text="webann").focus()
    b.keyboard.press("Enter")
    expect(b.locator("#messages .text")).to_have_text(["hi bob 👋"], timeout=WAIT)
    expect(badge).to_have_count(0)
    expect(a.locator("#messages .msg.mine")).to_have_attribute(
        "data-state", "read", timeout=WAIT
    )
    expect(b.locator("#compose-text")).to_be_focused()
    b.keyboard.type("hello ann")
    b.keyboard.press("Enter")
    expect(a.locator("#messages .text")).to_have_text(
        ["hi bob 👋", "hello ann"], timeout=WAIT
    )
    # At phone width one pane at a time: Escape goes back to the list, on
    # the conversation's button; Enter opens it again.
    expect(b.locator("#side")).to_be_hidden()
    b.keyboard.press("Escape")
    expect(b.locator("#side")).to_be_visible()
    expect(b.locator("#chat")).to_be_hidden()
    expect(b.locator("#conversations button", has_text="webann")).to_be_focused()
    # A message from someone else redraws the list (its conversation comes
    # first): the keyboard stays where it was.
    cid = account(url.rstrip("/"), "webcid")
    bob_id = b.evaluate("() => JSON.parse(localStorage.getItem('cim.account')).userId")
    api(
        url.rstrip("/"),
        "/p2pRoute",
        {"userId": cid["userId"], "receiveUserId": bob_id, "msg": "psst"},
        cid["token"],
    )
    expect(b.locator("#conversations button").first).to_contain_text(
        "webcid", timeout=WAIT
    )
    expect(b.locator("#conversations button", has_text="webann")).to_be_focused()
    b.keyboard.press("Enter")
    expect(b.locator("#compose-text")).to_be_focused()
    b.keyboard.press("Escape")

    # A group: Ann creates it, Bob joins with the keyboard, both talk.
    a.fill("#group-id", "webteam")
    a.click("#group-create")
    expect(a.locator("#chat-title")).to_have_text("# webteam", timeout=WAIT)
    b.fill("#group-id", "webteam")
    b.press("#group-id", "Enter")
    expect(b.locator("#chat-title")).to_have_text("# webteam", timeout=WAIT)
    a.fill("#compose-text", "welcome :tada:")
    a.press("#compose-text", "Enter")
    expect(b.locator("#messages .text")).to_have_text(["welcome 🎉"], timeout=WAIT)
    b.fill("#compose-text", "thanks, <b>great</b> :heart:")
    b.press("#compose-text", "Enter")
    expect(a.locator("#messages .text")).to_have_text(
        ["welcome 🎉", "thanks, <b>great</b> ❤️"], timeout=WAIT
    )
    shot = os.environ.get("CIM_WEB_SCREENSHOT") or str(tmp_path / "chat.png")
    a.screenshot(path=shot)
    with open(shot, "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    a.click("#members")
    expect(a.locator("#member-list li")).to_have_text(
        ["webann", "webbob"], timeout=WAIT
    )
    b.click("#leave")
    expect(b.locator("#conversations button", has_text="webteam")).to_have_count(0)


def test_the_owner_invites_and_answers_requests(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    url = node.url("route") + "/"
    owner = Tab(browser, url)
    guest = Tab(browser, url, phone=True)
    tabs.extend([owner, guest])
    owner.log_in("webowner")
    guest.log_in("webguest")
    o, g = owner.page, guest.page
    # An invite-only group: the guest cannot join until invited by name
    # (written as the route compares names: case does not matter).
    o.select_option("#group-policy", "invite")
    o.fill("#group-id", "closed")
    o.click("#group-create")
    expect(o.locator("#chat-title")).to_have_text("# closed", timeout=WAIT)
    g.fill("#group-id", "closed")
    g.press("#group-id", "Enter")
    expect(g.locator("#group-error")).not_to_be_empty(timeout=WAIT)
    o.click("#members")
    expect(o.locator("#group-admin")).to_be_visible(timeout=WAIT)
    expect(o.locator("#requests")).to_be_hidden()
    o.fill("#invite-name", "nobody-here")
    o.press("#invite-name", "Enter")
    expect(o.locator("#invite-result")).to_contain_text("Nobody called", timeout=WAIT)
    o.fill("#invite-name", "WebGuest")
    o.press("#invite-name", "Enter")
    expect(o.locator("#invite-result")).to_contain_text(
        "Invited webguest", timeout=WAIT
    )
    g.fill("#group-id", "closed")
    g.press("#group-id", "Enter")
    expect(g.locator("#chat-title")).to_have_text("# closed", timeout=WAIT)
    # An approval group: the guest asks, the owner approves from the list.
    o.select_option("#group-policy", "approval")
    o.fill("#group-id", "asking")
    o.click("#group-create")
    expect(o.locator("#chat-title")).to_have_text("# asking", timeout=WAIT)
    g.keyboard.press("Escape")
    g.fill("#group-id", "asking")
    g.press("#group-id", "Enter")
    expect(g.locator("#group-error")).to_have_text(
        "Asked to join: the owner decides.", timeout=WAIT
    )
    o.click("#members")
    expect(o.locator("#member-list li")).to_have_text(["webowner"], timeout=WAIT)
    row = o.locator("#requests li", has_text="webguest")
    expect(row).to_have_count(1, timeout=WAIT)
    row.get_by_role("button", name="Approve webguest").click()
    expect(o.locator("#member-list li")).to_have_text(
        ["webguest", "webowner"], timeout=WAIT
    )
    expect(o.locator("#requests li")).to_have_text(["Nobody is waiting."])
    # The guest is a member: the owner's message reaches it.
    o.fill("#compose-text", "approved")
    o.press("#compose-text", "Enter")
    expect(g.locator("#conversations button", has_text="asking")).to_have_count(
        1, timeout=WAIT
    )
    # Someone not the owner sees no owner's tools.
    g.locator("#conversations button", has_text="closed").click()
    g.click("#members")
    expect(g.locator("#member-list li")).to_have_text(
        ["webguest", "webowner"], timeout=WAIT
    )
    expect(g.locator("#group-admin")).to_be_hidden()


@needs_gateway
def test_a_page_and_a_library_client_chat(
    browser: Browser, node: Daemon, tabs: list[Tab], peers: Any
) -> None:
    peer = peers("libpeer")
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    tab.log_in("webeve")
    page = tab.page
    page.locator("#online button", has_text="libpeer").click()
    page.fill("#compose-text", "from the page <b>")
    page.press("#compose-text", "Enter")
    assert peer.received("from the page <b>") == ["from the page <b>"]
    me = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account')).userId")
    peer.send(me, "from the library :+1:")
    expect(page.locator("#messages .text")).to_have_text(
        ["from the page <b>", "from the library 👍"], timeout=WAIT
    )


@needs_gateway
def test_a_reload_resumes_with_nothing_lost_or_doubled(
    browser: Browser, node: Daemon, tabs: list[Tab], peers: Any
) -> None:
    peer = peers("reloader")
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    tab.log_in("webfay")
    page = tab.page
    me = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account')).userId")
    # More than a page of messages, received live.
    for i in range(1, 41):
        peer.command(private=me, text=f"m{i}")
    for _ in range(40):
        peer.next("acked")
    tab.open("reloader")
    every = [f"m{i}" for i in range(1, 41)] + ["mine 😄"]
    every += [f"m{i}" for i in range(41, 51)]
    expect(page.locator("#messages .text")).to_have_text(every[:40], timeout=WAIT)
    # And one of the page's own: history holds both sides.
    page.fill("#compose-text", "mine :smile:")
    page.press("#compose-text", "Enter")
    expect(page.locator("#messages .msg.mine")).to_have_attribute(
        "data-state", "stored", timeout=WAIT
    )
    # A reload while the peer goes on sending: the page resumes from its
    # cursors (the ten new ones come live), and shows the history again.
    page.reload(wait_until="commit")
    for i in range(41, 51):
        peer.send(me, f"m{i}")
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    tab.open("reloader")
    expect(page.locator("#messages .text").last).to_have_text("m50", timeout=WAIT)
    # Scroll back, a page at a time: everything, once each.  (The button
    # hides while a page loads, and scrolling to the top loads one too:
    # press it only when shown, then wait for the page it asked for.)
    shown = page.locator("#messages .text")
    for _ in range(len(every)):
        count = shown.count()
        if count >= len(every):
            break
        page.evaluate(
            "() => { const b = document.getElementById('earlier');"
            " if (!b.hidden) b.click(); }"
        )
        expect(shown).not_to_have_count(count, timeout=WAIT)
    expect(shown).to_have_text(every, timeout=WAIT)
    cursors = page.evaluate(
        "id => JSON.parse(localStorage.getItem('cim.state.' + id)).streams", me
    )
    assert max(c["seq"] for c in cursors.values()) == 51, cursors


# The page's own logic, in the browser (chat.js), on a fake WebSocket


def test_cursors_show_each_message_once_across_epochs(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    result = tab.page.evaluate(
        """async () => {
        const { Cursors } = await import("/chat.js");
        const store = new Map();
        const storage = { getItem: (k) => store.get(k) ?? null,
                          setItem: (k, v) => store.set(k, v) };
        const c = new Cursors(7, storage);
        const got = [];
        const receive = (tag, seq) => got.push(c.received("p:1:7", tag, seq));
        c.start("p:1:7", "e1", 0);
        receive("e1", 1); receive("e1", 2); receive("e1", 2); receive("e1", 1);
        // The store lost messages: a new epoch, which keeps the old one up
        // to seq 1 (shown already), from 0 again.
        c.start("p:1:7", "e2", 0);
        receive("e1", 1); receive("e2", 2); receive("e2", 2);
        const again = new Cursors(7, storage);  // a reload
        return { got, list: again.list(), seen: again.seen };
    }"""
    )
    assert [g["isNew"] for g in result["got"]] == [
        True, True, False, False, False, True, False,
    ]  # fmt: skip
    assert result["list"] == [{"conversation": "p:1:7", "seq": "2", "epoch": "e2"}]
    assert result["seen"] == {"p:1:7": {"e1": 2, "e2": 2}}


def test_session_speaks_the_json_wire(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    """
    The page's L{Session} against a fake WebSocket: the login frame, ACK
    cursors with the stream's epoch, the outbox, READ, dedupe after a
    resumed stream, and a final kick.
    """
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    result = tab.page.evaluate(
        """async () => {
        localStorage.clear();
        const { Session } = await import("/chat.js");
        const sockets = [];
        class FakeSocket {
          constructor(url, protocol) {
            Object.assign(this, { url, protocol, sent: [], readyState: 1 });
            sockets.push(this);
            setTimeout(() => this.onopen(), 0);
          }
          send(text) { this.sent.push(JSON.parse(text)); }
          close() { this.readyState = 3; }
          push(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
        }
        const route = { token: null, calls: [], async call(path, body) {
          this.calls.push([path, body]);
          return { token: "t" + this.calls.length, ip: "127.0.0.1",
                   cimServerPort: 1, webSocketUrl: "ws://127.0.0.1:9/" };
        } };
        const account = { userId: 7, userName: "seven", token: "t0" };
        const s = new Session(route, account, "web-test", { websocket: FakeSocket });
        const events = [];
        for (const type of ["message", "stored", "read", "reset", "kicked"]) {
          s.addEventListener(type, (e) => events.push([type, e.detail]));
        }
        const tick = (ms = 10) => new Promise((r) => setTimeout(r, ms));
        s.sendText("queued while connecting", { receiveUserId: 9 });
        await s.start();
        await tick();
        const ws = sockets[0];
        ws.push({ cmd: "LOGIN_RESPONSE", device: "web-test",
                  cursors: [{ conversation: "p:7:9", seq: "0", epoch: "e1" }] });
        const message = (seq, sender, text, extra = {}) => ({
          msgId: String(100 + seq), conversation: "p:7:9", seq: String(seq),
          senderId: String(sender), senderName: sender === 7 ? "seven" : "nine",
          text, timestamp: "1700000000000", epoch: "e1", ...extra });
        const sent = ws.sent[1];
        ws.push({ cmd: "ACK", clientMsgId: sent.clientMsgId, msgId: "101",
                  seq: "1", conversation: "p:7:9" });
        ws.push({ cmd: "MESSAGE", messages: [message(1, 7, "queued while connecting",
                  { clientMsgId: sent.clientMsgId })] });
        ws.push({ cmd: "MESSAGE", messages: [message(2, 9, "hello")] });
        ws.push({ cmd: "MESSAGE", messages: [message(2, 9, "hello")] });
        ws.push({ cmd: "READ", requestId: "9",
                  cursors: [{ conversation: "p:7:9", seq: "1" }] });
        await tick(400);
        s.markRead("p:7:9", 2);
        // The connection drops; the next one resumes from the cursors.
        ws.onclose({ code: 1006, reason: "" });
        await tick(1500);
        const ws2 = sockets[1];
        ws2.push({ cmd: "LOGIN_RESPONSE",
                   cursors: [{ conversation: "p:7:9", seq: "2", epoch: "e1" }] });
        ws2.push({ cmd: "MESSAGE", messages: [message(2, 9, "hello"), message(3, 9, "again")] });
        ws2.push({ cmd: "KICK", errorReason: "logged in again elsewhere" });
        await tick(400);
        return { first: ws.sent, second: ws2.sent, protocol: ws.protocol,
                 events, outbox: s.cursors.outbox.length, state: s.state,
                 logins: route.calls.map((c) => c[1]) };
    }"""
    )
    assert result["protocol"] == "cim.v1.json"
    login, send = result["first"][0], result["first"][1]
    assert login == {
        "cmd": "LOGIN_REQUEST",
        "requestId": "7",
        "reqMsg": "seven",
        "token": "t1",
        "cursors": [],
    }
    assert send["cmd"] == "MESSAGE" and send["receiveUserId"] == "9"
    assert send["reqMsg"] == "queued while connecting" and send["clientMsgId"]
    acks = [f for f in result["first"] if f["cmd"] == "ACK"]
    assert acks == [
        {
            "cmd": "ACK",
            "cursors": [{"conversation": "p:7:9", "seq": "2", "epoch": "e1"}],
        }
    ]
    reads = [f for f in result["first"] if f["cmd"] == "READ"]
    assert reads == [
        {"cmd": "READ", "cursors": [{"conversation": "p:7:9", "seq": "2"}]}
    ]
    # The second login names the device and resumes from the cursors.
    assert result["logins"][1]["device"] == "web-test"
    assert result["second"][0]["cursors"] == [
        {"conversation": "p:7:9", "seq": "2", "epoch": "e1"}
    ]
    kinds = [(kind, d.get("message", {}).get("text")) for kind, d in result["events"]]
    assert kinds == [
        ("stored", None),
        ("message", "queued while connecting"),
        ("message", "hello"),
        ("read", None),
        ("message", "again"),
        ("kicked", None),
    ]
    assert result["outbox"] == 0 and result["state"] == "offline"


@needs_gateway
def test_a_page_survives_its_server_killed(
    browser: Browser, zk_url: str, tmp_path: Path, tabs: list[Tab]
) -> None:
    """
    Redis, ZooKeeper, a route and two servers as separate processes: the
    page's server is killed with C{kill -9} while a library client sends to
    the page; the page logs in again through the route, on the other
    server, and shows every message once.
    """
    processes = Processes(tmp_path)
    try:
        redis = RedisServer(tmp_path / "redis", processes, appendfsync="everysec")
        redis.start_blocking()
        cluster = Cluster(
            processes,
            tmp_path / "cluster",
            redis.url(),
            f"zk://{urlsplit(zk_url).netloc}/cimweb-{uuid.uuid4().hex[:10]}",
            SECRET,
            server_args=["--ws-port", "0"],
        )
        cluster.start_blocking(2)
        url = cluster.url
        peer = Peer(processes, url, "survivorpeer", tmp_path / "peer.log")
        tab = Tab(browser, url + "/")
        tabs.append(tab)
        tab.log_in("webgil")
        page = tab.page
        expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
        me = page.evaluate(
            "() => JSON.parse(localStorage.getItem('cim.account')).userId"
        )
        peer.send(me, "before")
        tab.open("survivorpeer")
        expect(page.locator("#messages .text")).to_have_text(["before"], timeout=WAIT)
        devices = api(url, "/devices", {"userId": me}, secret=SECRET)
        (held,) = [d["server"] for d in devices if d["device"].startswith("web-")]
        (victim,) = [
            s for s in cluster.servers.values() if str(s.port) in held.split(":")
        ]
        victim.daemon.kill()
        for i in range(1, 6):
            peer.command(private=me, text=f"after {i}")
        for _ in range(5):
            peer.next("acked", timeout=60)
        expect(page.locator("#messages .text")).to_have_text(
            ["before"] + [f"after {i}" for i in range(1, 6)], timeout=45_000
        )
        expect(page.locator("#status")).to_have_text("online")
        # And it sends again, from the other server.
        page.fill("#compose-text", "still here")
        page.press("#compose-text", "Enter")
        assert peer.received("still here").count("still here") == 1
    finally:
        processes.stop_all()


def spki_hash(pem: Path) -> str:
    """
    The base64 SHA-256 of a certificate's public key, as Chromium's
    C{--ignore-certificate-errors-spki-list} takes it.
    """
    certificate = x509.load_pem_x509_certificate(pem.read_bytes())
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


@needs_gateway
def test_https_and_wss_with_the_development_certificates(
    playwright: Playwright, tmp_path: Path
) -> None:
    """
    The route over https and the WebSocket over wss (C{make dev-certs}'s
    certificate): the page logs in and chats.  The browser trusts exactly
    that certificate's key (Chromium takes no CA file on the command line).
    """
    certs = make_dev_certs(tmp_path / "certs")
    tls = f"ssl:{{port}}:privateKey={certs.key}:certKey={certs.cert}"
    processes = Processes(tmp_path)
    node = Daemon(
        "standalone",
        "cim-standalone",
        [],
        tmp_path,
        processes,
        listen={"route-port": tls, "ws-port": tls},
    )
    browser = launch(
        playwright, f"--ignore-certificate-errors-spki-list={spki_hash(certs.cert)}"
    )
    try:
        node.start()
        node.wait_ready_blocking()
        url = f"https://127.0.0.1:{node.ports['route']}/"
        one, two = Tab(browser, url), Tab(browser, url)
        two.log_in("tlstwo")
        one.log_in("tlsone")
        for tab in (one, two):
            expect(tab.page.locator("#status")).to_have_text("online", timeout=WAIT)
        one.page.locator("#online button", has_text="tlstwo").click()
        one.page.fill("#compose-text", "over wss")
        one.page.press("#compose-text", "Enter")
        two.open("tlsone")
        expect(two.page.locator("#messages .text")).to_have_text(
            ["over wss"], timeout=WAIT
        )
        assert two.sockets and all(u.startswith("wss://") for u in two.sockets)
        assert not one.errors and not two.errors
    finally:
        browser.close()
        processes.stop_all()


@needs_gateway
def test_a_network_loss_is_survived(
    browser: Browser, node: Daemon, tabs: list[Tab], peers: Any
) -> None:
    """
    The browser goes offline: a send waits in the outbox (sending...), the
    page logs in again when the network is back, sends it once, and gets
    what came meanwhile.
    """
    peer = peers("netpeer")
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    tab.log_in("webhal")
    page = tab.page
    me = page.evaluate("() => JSON.parse(localStorage.getItem('cim.account')).userId")
    page.locator("#online button", has_text="netpeer").click()
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    tab.context.set_offline(True)
    expect(page.locator("#status")).to_have_text("offline", timeout=WAIT)
    page.fill("#compose-text", "typed offline")
    page.press("#compose-text", "Enter")
    expect(page.locator("#messages .msg.mine")).to_have_attribute(
        "data-state", "sending"
    )
    peer.send(me, "sent meanwhile")
    tab.context.set_offline(False)
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    # In the order the store took them.
    expect(page.locator("#messages .text")).to_have_text(
        ["sent meanwhile", "typed offline"], timeout=WAIT
    )
    expect(page.locator("#messages .msg.mine")).not_to_have_attribute(
        "data-state", "sending", timeout=WAIT
    )
    assert peer.received("typed offline").count("typed offline") == 1


def test_session_resends_after_a_passing_error_only(
    browser: Browser, node: Daemon, tabs: list[Tab]
) -> None:
    tab = Tab(browser, node.url("route") + "/")
    tabs.append(tab)
    result = tab.page.evaluate(
        """async () => {
        localStorage.clear();
        const { Session } = await import("/chat.js");
        const sockets = [];
        class FakeSocket {
          constructor() { this.sent = []; this.readyState = 1; sockets.push(this);
                          setTimeout(() => this.onopen(), 0); }
          send(text) { this.sent.push(JSON.parse(text)); }
          close() {}
          push(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
        }
        const route = { async call() {
          return { token: "t", webSocketUrl: "ws://127.0.0.1:9/" }; } };
        const s = new Session(route, { userId: 7, userName: "seven", token: "t" },
                              "web-test", { websocket: FakeSocket });
        const failed = [];
        s.addEventListener("failed", (e) => failed.push(e.detail.reason));
        await s.start();
        await new Promise((r) => setTimeout(r, 10));
        const ws = sockets[0];
        ws.push({ cmd: "LOGIN_RESPONSE" });
        const busy = s.sendText("later", { groupId: "g1" });
        const refused = s.sendText("never", { groupId: "g2" });
        ws.push({ cmd: "ERROR", errorCode: 6000, errorReason: "slow down",
                  clientMsgId: busy.clientMsgId });
        ws.push({ cmd: "ERROR", errorCode: 8006, errorReason: "not a member",
                  clientMsgId: refused.clientMsgId });
        await new Promise((r) => setTimeout(r, 2500));
        return { texts: ws.sent.filter((f) => f.cmd === "MESSAGE").map((f) => f.reqMsg),
                 failed, outbox: s.cursors.outbox.map((i) => i.text) };
    }"""
    )
    assert result["texts"] == ["later", "never", "later"]
    assert result["failed"] == ["not a member"]
    assert result["outbox"] == ["later"]
