"""
C{twistd -n cim-client}: the console client.

On a terminal it edits lines (L{cim.client.terminal}: the terminal in raw
mode, restored when the reactor stops); with its input piped, it reads
lines as they come.

It is one device of its user: its device id is kept in its state folder
(C{--state-dir}), or given with C{--device}.  It writes no pid file (unless
twistd's C{--pidfile} names one): several consoles may run from one folder.

Its logs go to a file (C{--logfile}, by default one per route, user and
state folder: C{<state-dir>/logs/<route>/<user>.log}), never into the
console: unless twistd's own C{--logfile} names a file, L{makeService}
points C{sys.stdout} (where twistd's log observer writes, looked up after
L{makeService}) at that file, while the console writes to file descriptor
1 through L{StandardIO}.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python import usage

from cim.client.console import Console, echo_switch
from cim.client.history import History, history_path, thread_runner
from cim.client.library import Client
from cim.client.statefile import route_slug, slug
from cim.interfaces import IReactor
from cim.limits import DEVICE_ID, DEVICE_ID_RULE
from cim.tls import trust_root

DEFAULT_ROUTE = "http://127.0.0.1:8083"


def _user_id(text: str) -> int:
    """
    Parse C{--user-id}.
    """
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--user-id must be a number, not {text!r}") from None
    if value <= 0:
        raise usage.UsageError("--user-id must be positive")
    return value


#: twistd's pid file when none is named.
DEFAULT_PIDFILE = "twistd.pid"


class Options(usage.Options):
    """
    The options of C{twistd -n cim-client}.
    """

    synopsis = "--user <name> [options]"
    longdesc = (
        "Chat from the terminal (run it with `twistd -n cim-client`). A plain "
        "line goes to whom the prompt names (:to @<user>, :to <group>, :to all "
        "set it; nobody at first), <userId>;;<text> and @<name> <text> are "
        "private messages, :all lists the commands, Ctrl-D quits."
    )
    optParameters = [
        ["route", "r", DEFAULT_ROUTE, "The route's URL (http:// or https://)."],
        [
            "ca-file",
            None,
            None,
            "A PEM file of the CAs whose certificates the route (https://) and "
            "the IM servers (TLS) must carry (default: the system's).",
        ],
        ["user", "u", None, "Your user name (registered if new)."],
        [
            "password",
            None,
            None,
            "Your password (asked for when the account needs one).",
        ],
        [
            "user-id",
            None,
            None,
            "Log in CIM style with an existing user id (and its --user name).",
            _user_id,
        ],
        ["history-dir", None, "~/.cim/history", "Where the chat history is kept."],
        [
            "state-dir",
            None,
            "~/.cim/state",
            "Where the receive cursors, account keys and device ids are kept.",
        ],
        [
            "device",
            None,
            None,
            "This console's device id (default: one kept in --state-dir per "
            "route and account). A new login of the same device logs the old "
            "one out.",
        ],
        [
            "logfile",
            None,
            None,
            "The client's log file (default: <state-dir>/logs/<route>/<user>.log, "
            "with -<device> when --device is given).",
        ],
    ]

    def postOptions(self) -> None:
        # A console is started once per user, often several from one
        # folder: it never writes twistd's pid file (unless asked to).
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("pidfile") == DEFAULT_PIDFILE:
            parent["pidfile"] = ""
        if not self["user"]:
            raise usage.UsageError("--user is required")
        if not self["route"].startswith(("http://", "https://")):
            raise usage.UsageError(
                f"--route must be an http:// or https:// URL, not {self['route']!r}"
            )
        if self["device"] is not None and not DEVICE_ID.fullmatch(self["device"]):
            raise usage.UsageError(f"--device: {DEVICE_ID_RULE}")
        if self["ca-file"] is not None:
            try:
                trust_root(self["ca-file"])
            except ValueError as e:
                raise usage.UsageError(f"--ca-file: {e}") from None
        if self["logfile"] is None:
            self["logfile"] = str(default_logfile(self))


def default_logfile(options: usage.Options) -> Path:
    """
    The log file of a console: one per state folder (a device), route and
    user (and device, when named), so that no two consoles share one.
    """
    name = slug(options["user"], hashed=True)
    if options["device"]:
        name += "-" + slug(options["device"])
    state = Path(options["state-dir"]).expanduser()
    return state / "logs" / route_slug(options["route"]) / f"{name}.log"


class ConsoleService(Service):
    """
    Runs the console on standard input and output, logs in, and stops the
    reactor when the user quits.
    """

    log = Logger()

    def __init__(self, reactor: IReactor, options: usage.Options) -> None:
        self.reactor = reactor
        self.options = options
        self.console: Console | None = None
        self.client: Client | None = None

    def startService(self) -> None:
        from twisted.internet.stdio import StandardIO

        super().startService()
        options = self.options
        reactor = self.reactor
        self.client = client = Client(
            reactor,
            options["route"],
            state_dir=Path(options["state-dir"]).expanduser(),
            ca_file=options["ca-file"],
            device=options["device"],
        )
        history_dir = Path(options["history-dir"]).expanduser()
        runner = thread_runner(reactor)

        def history(user_id: int) -> History:
            # Per route, account (its key, else its name) and device.
            path = history_path(
                history_dir,
                user_id,
                client.route.url,
                client.account_key or client.user_name,
                client.device,
            )
            return History(path, runner)

        terminal = os.isatty(0) and os.isatty(1)
        self.console = console = Console(
            client,
            reactor,
            history_factory=history,
            on_quit=self._quit,
            route_url=options["route"],
            secret_input=None if terminal else echo_switch(0),
        )
        client.listener = console
        if terminal:
            self._on_terminal(console)
        else:
            StandardIO(console, reactor=reactor)
        ensureDeferred(
            console.start(options["user"], options["password"], options["user-id"])
        ).addErrback(lambda f: self.log.failure("Starting the console failed", f))

    def _on_terminal(self, console: Console) -> None:
        """
        Run C{console} on the terminal: raw mode (restored once the reactor
        stopped), a L{LineEditor} on Twisted's terminal protocol, resized
        with the window.
        """
        from contextlib import ExitStack

        from twisted.internet.stdio import StandardIO

        from cim.client.terminal import Keyboard, LineEditor, raw_mode

        raw = ExitStack()
        raw.enter_context(raw_mode(0))
        self.reactor.addSystemEventTrigger("after", "shutdown", raw.close)
        editor = LineEditor(console.line_typed)
        console.attach(editor)
        StandardIO(Keyboard(lambda: editor), reactor=self.reactor)

        def resize(*_: Any) -> None:
            try:
                width, height = os.get_terminal_size(1)
            except OSError:
                return
            editor.terminalSize(width, height)

        resize()
        signal.signal(signal.SIGWINCH, lambda *_: self.reactor.callFromThread(resize))

    def _quit(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.console is None:
            return None
        return ensureDeferred(self.console.quit())


def _log_to_file(path: Path) -> None:
    """
    Send twistd's log (which it writes to C{sys.stdout}) to C{path}.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115


def makeService(options: usage.Options) -> IService:
    """
    The console service; logs go to C{--logfile} unless twistd's own is set.
    """
    from twisted.internet import reactor

    parent = getattr(options, "parent", None)
    if parent is not None and not parent.get("nodaemon"):
        raise SystemExit("cim-client is interactive: run it as `twistd -n cim-client`")
    twistd_logfile = parent.get("logfile") if parent is not None else None
    if twistd_logfile in (None, "-"):
        _log_to_file(Path(options["logfile"]).expanduser())
    return ConsoleService(cast(IReactor, reactor), options)
