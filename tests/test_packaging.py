"""
C{pip install .} (not editable) gives working daemons: in a fresh virtual
environment, C{twistd cim-server}, C{cim-route}, C{cim-client} and
C{cim-standalone} answer C{--help}, and a standalone node starts, answers
C{/health} on its route port, serves the web client's files, and stops.

How it stays fast (a few seconds) and off the network:

  - the fresh environment gets no package of its own but cim: a C{.pth}
    file puts this environment's site-packages after its own, so Twisted,
    klein and the rest come from there, as C{make install} installed them
    from the pins (C{setup.cfg}'s own declarations are checked by
    C{make install}'s C{pip check});
  - cim is built with this environment's setuptools (C{--no-build-isolation},
    C{--no-index}: nothing is downloaded), from a copy of the source tree,
    since a build writes C{build/} and C{cim.egg-info} beside the sources;
  - C{twistd} is the script C{pip install Twisted} writes (Twisted's
    C{console_scripts} entry point), written into the fresh environment
    since Twisted is not installed there.

Every command runs with C{PYTHONSAFEPATH=1} from outside the source tree,
so that the installed copy of cim is the only one importable; the test
checks that it is the one imported, plugins included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import venv
from pathlib import Path

import pytest

from tests.kit.cluster import ROOT, Daemon, Processes
from tests.kit.http import get_json

pytestmark = pytest.mark.integration

PLUGINS = ("cim-server", "cim-route", "cim-client", "cim-standalone")
#: Not needed to build or run cim: at the top of the tree...
NOT_COPIED_TOP = {".git", ".venv", ".run", "build", "dist", "tests", "bench", "fuzz",
                  "scripts"}  # fmt: skip
#: ... and anywhere.
NOT_COPIED = shutil.ignore_patterns(
    "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "dropin.cache"
)


def not_copied(directory: str, names: list[str]) -> set[str]:
    top = NOT_COPIED_TOP if Path(directory) == ROOT else set()
    return set(NOT_COPIED(directory, names)) | (top & set(names))


class Environment:
    """
    A fresh virtual environment in C{directory} whose other packages come
    from this one.
    """

    def __init__(self, directory: Path) -> None:
        venv.EnvBuilder(with_pip=False).create(directory)
        self.directory = directory
        self.python = directory / "bin" / "python"
        self.site = Path(
            sysconfig.get_path(
                "purelib", vars={"base": str(directory), "platbase": str(directory)}
            )
        )
        ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (self.site / "_cim_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
        self.twistd = directory / "bin" / "twistd"
        self.twistd.write_text(
            f"#!{self.python}\n"
            "import sys\n"
            "from twisted.scripts.twistd import run\n"
            "sys.exit(run())\n"
        )
        self.twistd.chmod(0o755)
        self.env = dict(os.environ, PYTHONSAFEPATH="1")
        self.env.pop("PYTHONPATH", None)

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=str(self.directory),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Environment:
    """
    cim installed with C{pip install .} into a fresh environment.
    """
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=not_copied)
    environment = Environment(base / "venv")
    done = environment.run(
        sys.executable, "-m", "pip", "--python", environment.python,
        "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "-q", source,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return environment


def test_installed_copy_is_imported(installed: Environment) -> None:
    done = installed.run(
        installed.python,
        "-c",
        "import cim, cim._proto.cim_pb2, twisted.plugins.cim_plugins as p\n"
        "import cim.store.redis.scripts as s\n"
        "print(cim.__file__); print(p.__file__); print(s.__file__)",
    )
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert Path(path).is_relative_to(installed.site), done.stdout
    # The package data came along: the Redis store's Lua scripts.
    scripts = Path(done.stdout.split()[-1]).parent
    source = ROOT / "cim" / "store" / "redis" / "scripts"
    assert {p.name for p in scripts.glob("*.lua")} == {
        p.name for p in source.glob("*.lua")
    }


@pytest.mark.parametrize("plugin", PLUGINS)
def test_help(installed: Environment, plugin: str) -> None:
    done = installed.run(installed.twistd, plugin, "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage:" in done.stdout and f"{plugin} " in done.stdout, done.stdout


def test_standalone_answers_health(installed: Environment) -> None:
    processes = Processes(installed.directory)
    standalone = Daemon(
        "standalone",
        "cim-standalone",
        [],
        installed.directory / "logs",
        processes,
        env={"PYTHONSAFEPATH": "1"},
        twistd=[str(installed.twistd)],
    )
    try:
        standalone.start()
        standalone.wait_ready_blocking()
        health = get_json(f"{standalone.url('route')}/health", timeout=10)
        assert health["code"] == "9000", health
        # The web client's files came along (package data) and are served.
        with urllib.request.urlopen(standalone.url("route") + "/", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/html")
            assert b'src="/app.js"' in r.read()
        with urllib.request.urlopen(
            standalone.url("route") + "/app.js", timeout=10
        ) as r:
            assert b"textContent" in r.read()
        standalone.stop_blocking()
        assert not standalone.running
        assert "Traceback" not in standalone.log_text(), standalone.log_tail()
    finally:
        processes.stop_all()
