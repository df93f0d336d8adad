"""Who may talk to the server: the token, the ``Host`` header and the origin of writes.

* **Token.** Required when the server listens beyond loopback (or when given). The login link
  ``/login?token=...`` sets it as an HttpOnly, SameSite=Strict cookie, so the page's own
  ``<audio>`` and ``<img>`` requests carry it; API clients send ``Authorization: Bearer``.
  Anything else gets 401.
* **Host.** A page on another site whose name is made to resolve to 127.0.0.1 (DNS
  rebinding) sends its own name as ``Host``: only the bound address and the loopback names
  are accepted (any name when bound to a wildcard address, where the token guards).
* **Origin of writes.** A POST whose ``Origin`` (or ``Sec-Fetch-Site``) is another site is
  refused, and a POST must be JSON (a cross-site form cannot send that without a preflight).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from urllib.parse import parse_qs, urlsplit

COOKIE = "soundlake_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARDS = {"0.0.0.0", "::", ""}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's netloc, without port or IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware in front of the app: every request passes the checks above or is refused."""

    def __init__(self, app, host: str, token: str | None):
        self.app, self.token = app, token
        self.any_host = host in WILDCARDS
        self.hosts = LOOPBACK_NAMES | {host.lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if not self.any_host and host not in self.hosts:
            return await refuse(send, 403, f"Host {host!r} is not this server's (DNS rebinding?)")
        if scope["method"] not in ("GET", "HEAD"):
            why = cross_site(headers)
            if why:
                return await refuse(send, 403, why)
        if self.token is not None:
            if scope["path"] == "/login":
                return await self.login(scope, send)
            if not self.authorized(headers):
                return await refuse(send, 401, "a token is needed: open the login link the server printed, "
                                    "or send Authorization: Bearer <token>")
        return await self.app(scope, receive, send)

    def authorized(self, headers: dict[str, str]) -> bool:
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                given.append(value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    async def login(self, scope, send):
        token = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return await refuse(send, 401, "wrong token: use the login link the server printed")
        cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        # A page of our own origin moves on to the app (a redirect from a link opened elsewhere
        # would not carry a SameSite=Strict cookie), and drops the token from the address bar.
        body = b"<!doctype html><meta charset=utf-8><title>soundlake</title><script src=/static/login.js></script>" \
               b"<a href=/>continue</a>"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/html; charset=utf-8"), (b"set-cookie", cookie.encode()),
            (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer")]})
        await send({"type": "http.response.body", "body": body})


def cross_site(headers: dict[str, str]) -> str | None:
    """Why a write is refused (None: it is same-origin, or from a non-browser client)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"cross-site write refused (Sec-Fetch-Site: {fetch_site})"
    origin = headers.get("origin")
    if origin is not None:
        netloc = urlsplit(origin).netloc.lower()
        if origin == "null" or netloc != headers.get("host", "").strip().lower():
            return f"cross-site write refused (Origin {origin} is not this server)"
    if not headers.get("content-type", "").lower().startswith("application/json"):
        return "writes take JSON (Content-Type: application/json)"
    return None


async def refuse(send, status: int, message: str):
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
