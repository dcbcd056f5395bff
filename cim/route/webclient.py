"""
The web client's static files, served by the route at C{/}.

The page (C{cim/route/web/}: C{index.html}, plain JavaScript modules and a
style sheet; no build step) uses the route's HTTP API for accounts, logins,
groups and history, and the IM server's WebSocket for live chat.

L{WebClient} wraps the route's Klein resource: a C{GET} or C{HEAD} of one of
the page's files is answered here, with its content type and a strict
Content-Security-Policy (scripts, styles and images from this origin only,
nothing inline; WebSocket connections to any server, since the IM servers
listen on ports of their own); every other request goes to the API
unchanged, so its JSON answers, 404s and 405s stay as they were.

C{/emoji.json} is made from the console's alias table
(L{cim.client.emoji.EMOJI}), so that the page renders C{:smile:} as the
console does.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from cim.client.emoji import EMOJI

#: The page's files (their names under C{cim/route/web/}) by URL path.
FILES: dict[bytes, tuple[str, bytes]] = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/index.html": ("index.html", b"text/html; charset=utf-8"),
    b"/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"/chat.js": ("chat.js", b"text/javascript; charset=utf-8"),
    b"/app.css": ("app.css", b"text/css; charset=utf-8"),
    b"/favicon.svg": ("favicon.svg", b"image/svg+xml"),
}

#: The emoji table's path.
EMOJI_PATH = b"/emoji.json"

#: What the page may load and connect to.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src 'self'; connect-src 'self' ws: wss:; manifest-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Headers on every file of the page.
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cache-Control", b"no-cache"),
)


def load_files() -> dict[bytes, tuple[bytes, bytes]]:
    """
    The page's files, read from the package: URL path to (content type,
    body).
    """
    folder = resources.files("cim.route") / "web"
    files = {
        path: (kind, (folder / name).read_bytes())
        for path, (name, kind) in FILES.items()
    }
    table = json.dumps(EMOJI, ensure_ascii=False, separators=(",", ":"))
    files[EMOJI_PATH] = (b"application/json; charset=utf-8", table.encode("utf-8"))
    return files


class WebClient(Resource):
    """
    The page's files in front of the route's API (C{api}, the Klein
    resource): see the module docstring.
    """

    isLeaf = True

    def __init__(self, api: Any) -> None:
        super().__init__()
        self.api = api
        self.files = load_files()

    def render(self, request: IRequest) -> Any:
        found = self.files.get(request.path)
        if found is None or request.method not in (b"GET", b"HEAD"):
            return self.api.render(request)
        kind, body = found
        request.setHeader(b"Content-Type", kind)
        for name, value in HEADERS:
            request.setHeader(name, value)
        return body
