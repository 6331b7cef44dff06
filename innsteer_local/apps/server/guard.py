"""What stands between the network and the server's routes (docs/SECURITY.md, "The server").

A plain ASGI middleware, outermost, so every answer it gives is OpenAI-shaped JSON and no route
runs for a request it refuses. In order:

1. Host: the `Host` header must name the bound address, `localhost`, or an `--allowed-host`
   (a page on a rebound domain then cannot reach the server); a wildcard bind also accepts any IP
   literal, which no attacker's DNS can point elsewhere. 403.
2. Origin: a browser's cross-site request carries `Origin`; unless it is the server's own origin
   or a `--cors` origin, 403. Preflights from `--cors` origins are answered here.
3. API key: with a key, every route but the playground's static files needs
   `Authorization: Bearer KEY` (compared in constant time). 401.
4. POST bodies must be `application/json` (a browser's "simple" cross-site POST cannot send that
   type without a preflight). 415.
5. Body size: at most `max_body` bytes, read within `body_timeout` seconds. 413 / 408.

The h11 protocol below closes a connection that has not sent a complete request head within
`header_timeout` seconds (a half-open connection otherwise stays forever).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Optional

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
# paths served without a key: the playground page asks for the key itself
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/playground/",)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Policy:
    """The server's access rules; serve's options fill it."""

    host: str = "127.0.0.1"  # the bound address
    api_key: Optional[str] = None
    allowed_hosts: tuple[str, ...] = ()
    cors: tuple[str, ...] = ()  # origins allowed to call the API from a browser
    max_body: int = DEFAULT_MAX_BODY
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def host_allowed(self, host_header: str) -> bool:
        name = _host_name(host_header)
        if name is None:
            return False
        names = {"localhost", _host_name(self.host) or self.host, *(h.lower() for h in self.allowed_hosts)}
        if name in names:
            return True
        if self.host in WILDCARD_HOSTS:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        return origin in self.cors or origin.lower() in (f"http://{host_header.lower()}", f"https://{host_header.lower()}")

    def key_ok(self, authorization: Optional[str]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest on bytes of the same encoding: time independent of where they differ
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _host_name(header: str) -> Optional[str]:
    """The host part of a Host header, lower-cased, without port or IPv6 brackets."""
    h = header.strip().lower()
    if not h:
        return None
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else None
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def error_body(message: str, kind: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_json(send: Any, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """The ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        p = self.policy
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not p.host_allowed(host):
            return await send_json(send, 403, error_body(
                f"Host '{host[:80]}' is not served here; use the address the server listens on, localhost, or "
                "start serve with --allowed-host NAME", code="host_not_allowed"))
        origin = headers.get("origin")
        cors: tuple[tuple[bytes, bytes], ...] = ()
        if origin is not None:
            if not p.origin_allowed(origin, host):
                return await send_json(send, 403, error_body(
                    f"cross-origin requests from '{origin[:80]}' are refused; start serve with --cors ORIGIN to "
                    "allow a web app", code="origin_not_allowed"))
            if origin in p.cors:
                cors = ((b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"))
                if scope["method"] == "OPTIONS":
                    return await _preflight(send, cors)
        path = scope.get("path", "")
        public = scope["method"] == "GET" and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))
        if not public and not p.key_ok(headers.get("authorization")):
            return await send_json(send, 401, error_body(
                "missing or wrong API key: send 'Authorization: Bearer KEY' (the key serve was started with)",
                code="invalid_api_key"), ((b"www-authenticate", b"Bearer"), *cors))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return await send_json(send, 415, error_body(
                    f"request bodies must be JSON with 'Content-Type: application/json', got "
                    f"'{media[:60] or 'none'}'", code="unsupported_media_type"), cors)
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > p.max_body):
                return await send_json(send, 413, _too_large(p.max_body), cors)
            body = await _read_body(receive, p.max_body, p.body_timeout)
            if isinstance(body, int):
                if body == 408:
                    return await send_json(send, 408, error_body(
                        f"the request body did not arrive within {p.body_timeout:g} s", code="request_timeout"), cors)
                return await send_json(send, 413, _too_large(p.max_body), cors)
            receive = _replay(body, receive)
        if cors:
            send = _with_headers(send, cors)
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # the routes answer their own errors; this is the last resort
            if not started:
                await send_json(send, 500, error_body("internal server error", "server_error"))


def _too_large(limit: int) -> dict[str, Any]:
    return error_body(f"request body is larger than {limit} bytes (serve --max-body)", code="request_too_large")


async def _preflight(send: Any, cors: tuple[tuple[bytes, bytes], ...]) -> None:
    await send({"type": "http.response.start", "status": 204,
                "headers": [*cors, (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                            (b"access-control-allow-headers", b"Authorization, Content-Type"),
                            (b"access-control-max-age", b"600")]})
    await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Any, limit: int, timeout: float) -> bytes | int:
    """The whole body, or 413 past `limit` bytes, or 408 when it takes longer than `timeout`."""
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return 408
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        size += len(message.get("body", b""))
        if size > limit:
            return 413
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that gives the body read already, then passes on (to see the disconnect)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _with_headers(send: Any, extra: tuple[tuple[bytes, bytes], ...]) -> Any:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def protocol_class(header_timeout: float) -> type:
    """uvicorn's h11 protocol that closes a connection whose request head has not arrived within
    `header_timeout` seconds of the connection (or of the previous response): uvicorn's own
    keep-alive timer stops at the first byte, so a client sending a byte now and then would keep
    the connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: Optional[asyncio.TimerHandle] = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request head is complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head

    return HeaderTimeoutProtocol
