"""The server's errors: the OpenAI error body every route and realtime dialect answers with."""

from __future__ import annotations

import logging
from typing import Optional

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ..audio_url import AudioTooLargeError, FetchError, ForbiddenSourceError
from ..exceptions import AudioError, AudioTooLongError, UnsupportedAudioFormatError, VoxtralError
from .engine import EngineClosedError, QueueFullError, RequestTimeoutError

log = logging.getLogger("mlx_voxtral.server")
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error answered with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "request_too_large"}


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request: the client's fault
    with its message and ``param``, anything else a 500 that says nothing about internals."""
    if isinstance(exc, APIError):
        return exc
    param = getattr(exc, "param", None)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if exc.status_code < 500 else "internal server error"
        return APIError(exc.status_code, message, kind, code=_HTTP_CODES.get(exc.status_code), headers=exc.headers)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error", code="timeout")
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "server_error", code="shutting_down")
    if isinstance(exc, AudioTooLargeError):
        return APIError(413, str(exc), param=param, code="request_too_large")
    if isinstance(exc, ForbiddenSourceError):
        return APIError(403, str(exc), "permission_error", param=param, code="forbidden_source")
    if isinstance(exc, FetchError):
        return APIError(400, exc.public, param=param, code="fetch_failed")
    if isinstance(exc, UnsupportedAudioFormatError):
        return APIError(415, str(exc), param=param, code="unsupported_audio_format")
    if isinstance(exc, AudioTooLongError):
        return APIError(400, str(exc), param=param, code="audio_too_long")
    if isinstance(exc, AudioError):
        return APIError(400, str(exc), param=param, code="invalid_audio")
    if isinstance(exc, VoxtralError):
        return APIError(400, str(exc), param=param, code="invalid_request")
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error", "server_error")
