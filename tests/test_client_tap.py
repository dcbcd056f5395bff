"""
C{twistd -n cim-client}'s options as twistd parses them.
"""

from __future__ import annotations

from twisted.scripts.twistd import ServerOptions


def parse(*args: str) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions(list(args))
    return options


def test_the_console_writes_no_pid_file() -> None:
    # Two consoles (and a standalone node) started from one folder must not
    # refuse to run because of each other's twistd.pid.
    assert parse("-n", "cim-client", "--user", "alice")["pidfile"] == ""


def test_a_pid_file_asked_for_is_kept() -> None:
    options = parse("-n", "--pidfile", "alice.pid", "cim-client", "--user", "alice")
    assert options["pidfile"].endswith("alice.pid")


def test_other_plugins_keep_twistds_default() -> None:
    assert parse("-n", "cim-standalone")["pidfile"].endswith("twistd.pid")
