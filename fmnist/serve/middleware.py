"""The server's two ASGI middlewares, each around every request: CountRequests (outermost) counts and times it in
the metrics; LimitBody refuses a body over the limit."""

import time

from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmnist.serve import protocol
from fmnist.serve.metrics import Metrics


class CountRequests:
    """Counts every request by route template (so a fuzzer's random paths add no series) and status code, and
    times it. Outermost, so that it counts what the layers inside answer themselves (LimitBody's 413)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:   # a 500 too: its exception passes through here on its way to the outermost handler
            self.metrics.observe_request(_endpoint(scope, status), status, time.perf_counter() - start)


def _endpoint(scope: Scope, status: int) -> str:
    """The template of the route the request was for; "other" for a 404, and for a path no route fully matches."""
    route = scope.get("route")   # FastAPI names its own routes only; the plain ones are matched here, among the
    if route is None:            # app's routes as they are now, so that a route added after create_app is named too
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] is Match.FULL), None)
    return route.path if route is not None and status != 404 else "other"


class BodyTooLarge(Exception):
    """A body without Content-Length grew past the limit while it was read (app.py answers 413)."""


class LimitBody:
    """Refuses a body over `max_body` bytes with 413: from Content-Length before reading it, or while reading a
    chunked one, so that a large body is never held in memory whole."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is None:
            return await self.app(scope, self._limited(receive), send)
        try:
            too_large = int(length) > self.max_body
        except ValueError:
            too_large = False   # h11 refuses such a request before it gets here
        if not too_large:
            return await self.app(scope, receive, send)
        while (await receive()).get("more_body"):   # read what was sent, keeping none of it, so that the client
            pass                                     # hears the 413, not a reset
        await _send_error(send, 413, self.too_large())

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self.too_large())
            return message

        return receive_limited

    def too_large(self) -> str:
        return too_large_message(self.max_body)


async def read_body(receive: Receive, length: bytes | None, max_body: int) -> bytes:
    """The whole body of a request, for the hot path (fmnist.serve.hotpath). Over `max_body` bytes, by its
    Content-Length or while it is read, it raises BodyTooLarge once the rest is read and dropped, so that the
    client hears the 413, not a reset."""
    too_large = length is not None and length.isdigit() and int(length) > max_body
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        more = message.get("more_body", False)
        if not too_large:
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_large = size > max_body
    if too_large:
        raise BodyTooLarge(too_large_message(max_body))
    return b"".join(chunks)


def too_large_message(max_body: int) -> str:
    return f"the body is over {max_body / 2**20:g} MiB; send fewer images per request (or start the server " \
           "with a larger --max-body-mb)"


async def _send_error(send: Send, status: int, message: str) -> None:
    body = protocol.error_body(message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
