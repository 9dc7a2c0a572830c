"""Responses that notice a client going away while the model works for it.

`EventStream` sends server-sent events and listens for the client's disconnect at the same time,
whatever ASGI version the server speaks: the moment the client is gone the body iterator is closed,
and its `finally` cancels the generation (the scheduler drops it at its next step). `until_disconnect`
is the same listening for a request whose answer is sent whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def until_disconnect(receive: Receive) -> None:
    """Return when the client has closed the connection (the body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """A `text/event-stream` response over an async iterator of encoded events.

    Args:
        content: the events (an async generator; it is closed when the client goes away).
        headers: extra headers (the request id).
        on_close: called once when the response is over, however it ended (even unsent).
    """

    media_type = "text/event-stream"

    def __init__(self, content, headers: dict[str, str] | None = None, on_close: Callable[[], None] | None = None):
        base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers={**base, **(headers or {})})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator) as events:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _run(self, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while sending: the client is gone
                    pass
                group.cancel_scope.cancel()

            async def listen() -> None:
                await until_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(listen)
