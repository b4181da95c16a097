"""ASGI middleware of `t5qa serve`: the API key (compared in constant time, never logged), the request-body
limit (counted while the body streams in, so a client cannot make the server buffer more than
`max_request_bytes`), request ids with the structured access log, and a log filter that redacts the key."""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

# Paths served without the API key: the web page and its files (it asks the user for the key and sends it
# with every API call), and the API description. None of them hold data or reach the model.
OPEN_PATHS = ("/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static/",)

def _json_response_messages(status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> list[dict]:
    body = json.dumps({"error": message}).encode("utf-8")
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                     *headers]},
        {"type": "http.response.body", "body": body},
    ]


async def _send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str,
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    for message_part in _json_response_messages(status, message, headers):
        await send(message_part)


def _is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _key_from_headers(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-api-key":
            return value.strip()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return None


class ApiKeyMiddleware:
    """401 unless the request carries the key (`Authorization: Bearer KEY` or `X-API-Key: KEY`)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or _is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _key_from_headers(scope.get("headers", []))
        # compare_digest takes the same time wherever the first difference is, so timing leaks nothing.
        if given is None or not hmac.compare_digest(given, self._key):
            what = "missing" if given is None else "wrong"
            await _send_error(send, 401, f"API key {what}: send the header 'Authorization: Bearer <key>' "
                                         f"or 'X-API-Key: <key>'", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting the bytes as they stream
    in (a chunked upload has no Content-Length), before anything is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes; send fewer or shorter pairs " \
               f"(the server's --max-request-bytes)"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, self._message())
                    return
        received = 0
        response_started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged (anything else
                    # would become a generic 400) and reaches the app's handler as a JSON 413.
                    from fastapi import HTTPException

                    raise HTTPException(413, self._message())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception as exc:
            # Only when the body was read outside a route (no handler turned it into a response).
            if getattr(exc, "status_code", None) != 413 or response_started:
                raise
            await _send_error(send, 413, self._message())


class RedactKey(logging.Filter):
    """Replaces the API key with [redacted] in log records."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.key in message:
            record.msg, record.args = message.replace(self.key, "[redacted]"), ()
        return True


REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
access_log = logging.getLogger("t5qa.access")


def request_id_from(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a plain token of at most 64 characters (a load balancer's id then
    follows the request through), else a new random one; never text that could break a log line."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            given = value.decode("latin-1").strip()
            if 0 < len(given) <= 64 and set(given) <= _REQUEST_ID_CHARS:
                return given
            break
    return uuid.uuid4().hex


class RequestLogMiddleware:
    """Every HTTP request gets a request id (sent back as X-Request-ID and kept in `scope["state"]`), one JSON
    line in the `t5qa.access` log (time, id, method, path without its query string, status, milliseconds,
    client), and a call of `record(method, path, status, seconds)` for the metrics.

    It sits outside every other middleware, so refusals (401, 413) are logged and counted too. The query string
    is left out of the log: a client that puts the API key in the URL must not get it into the log.
    """

    def __init__(self, app: Any, record: Callable[[str, str, int, float], None] | None = None,
                 log: bool = True) -> None:
        self.app = app
        self.record = record
        self.log = log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before it answers

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER, request_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            if self.record is not None:
                self.record(scope["method"], scope["path"], status, seconds)
            if self.log:
                client = scope.get("client")
                access_log.info("%s", json.dumps({
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "ms": round(seconds * 1000, 2), "client": client[0] if client else None,
                }, ensure_ascii=True))
