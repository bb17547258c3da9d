"""uvicorn's h11 HTTP protocol with a deadline for each request's headers.

uvicorn arms no timer while a request's headers arrive (its keep-alive timer starts after a
response, and any byte received stops it), so a client that trickles its headers ("slow
loris") holds its connection for as long as it likes. Here a connection that has not
started a request within ``seconds`` of opening, or of its last response, is closed.
"""

from __future__ import annotations

from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_timeout(seconds: float) -> type:
    """An ``H11Protocol`` subclass for ``uvicorn.Config(http=...)``."""

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._armed_for = self.cycle  # the request before the one awaited
            self._header_timer = self.loop.call_later(seconds, self._header_deadline)

        def _header_deadline(self) -> None:
            waiting = self.cycle is self._armed_for and (self.cycle is None or self.cycle.response_complete)
            if waiting and not getattr(self, "_upgraded", False) and not self.transport.is_closing():
                self.transport.close()

        def handle_websocket_upgrade(self, event) -> None:
            self._upgraded = True
            self._header_timer.cancel()
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_settings(header_timeout: float = 10.0, limit_concurrency: Optional[int] = 512,
                     timeout_keep_alive: float = 5.0) -> dict:
    """``uvicorn.Config`` arguments that bound what one client can make the server hold: a
    header deadline, a connection cap, and websocket messages without per-message deflate
    (a few bytes of compressed silence inflate to megabytes queued ahead of the app, past
    any backpressure the app applies by not reading)."""
    return {"http": protocol_with_header_timeout(header_timeout), "limit_concurrency": limit_concurrency,
            "timeout_keep_alive": timeout_keep_alive, "ws_per_message_deflate": False}
