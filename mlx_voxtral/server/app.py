"""OpenAI-compatible HTTP and WebSocket API over the transcription ``Engine``.

Routes:

* ``POST /v1/chat/completions``: chat requests carrying audio (``audio_url``, ``input_audio``),
  answered with ``chat.completion`` or, with ``stream: true``, server-sent chunks.
* ``POST /v1/audio/transcriptions``: OpenAI's multipart upload; ``response_format`` json,
  text, srt, vtt or verbose_json; ``stream=true`` gives ``transcript.text.delta`` events.
* ``WS /v1/realtime``: live audio in (base64 PCM16 16 kHz), ``transcription.delta`` out, as
  vLLM serves Voxtral Realtime.
* ``GET /v1/models``, ``GET /health``.

This module only parses, validates and shapes; all model work is the engine's. Errors are
OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``:

=====  ===========================================================================
400    malformed JSON / base64 / form, bad parameter, unreadable or too long audio
401    missing or wrong API key
403    an audio_url the server may not read (local file outside the allowed folder,
       a remote URL without ``--allow-remote-urls``)
404    unknown route;  405 wrong method
413    request body or audio larger than the upload limit
415    wrong Content-Type, or audio in a format no decoder reads
429    the engine's queue is full (with ``Retry-After``)
504    the request ran past the engine's request timeout
=====  ===========================================================================

``temperature`` is the sampling temperature (0, or absent, is greedy decoding), with the
request's ``seed`` when given. ``max_tokens`` caps text tokens; above ``MAX_TOKENS_CAP`` it
is rejected. The request's ``model`` is not checked: one model is served, under the name
given to ``create_app``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..audio import SAMPLE_RATE, iter_audio
from ..audio_url import AudioTooLargeError, ForbiddenSourceError, SourcePolicy
from ..chat import (
    PART_SEPARATOR,
    Usage,
    audio_inputs,
    check_options,
    chunk,
    completion_id,
    completion_response,
    finish_reason,
)
from ..exceptions import AudioError, InvalidRequestError, UnsupportedAudioFormatError, VoxtralError
from ..results import DeltaText, Failed, Finished, PartDone
from ..validate import check_seed, check_temperature
from ..writers import render
from .engine import Engine, EngineClosedError, Job, QueueFullError, RequestTimeoutError

log = logging.getLogger(__name__)

MAX_TOKENS_CAP = 100_000
RETRY_AFTER_SECONDS = 1
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")


# errors ---------------------------------------------------------------------------------
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


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error", code="timeout")
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "server_error", code="shutting_down")
    if isinstance(exc, AudioTooLargeError):
        return APIError(413, str(exc), code="request_too_large")
    if isinstance(exc, ForbiddenSourceError):
        return APIError(403, str(exc), "permission_error", code="forbidden_source")
    if isinstance(exc, UnsupportedAudioFormatError):
        return APIError(415, str(exc), code="unsupported_audio_format")
    if isinstance(exc, AudioError):
        return APIError(400, str(exc), code="invalid_audio")
    if isinstance(exc, VoxtralError):
        return APIError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error", "server_error")


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    return api_error(exc).response()


async def _http_error_handler(request: Request, exc: HTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return APIError(exc.status_code, exc.detail, kind, code=codes.get(exc.status_code),
                    headers=exc.headers).response()


# request body size ------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a 413 for HTTP bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")


# helpers --------------------------------------------------------------------------------
def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage_tokens(results: list) -> dict:
    """OpenAI's transcription usage (``type: tokens``)."""
    u = Usage.from_results(results)
    return {"type": "tokens", "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _form_bool(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, str) or value.lower() not in ("true", "false", "1", "0"):
        raise APIError(400, f"'{name}' must be true or false", param=name)
    return value.lower() in ("true", "1")


def _form_float(value, name: str) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        number = float(value) if isinstance(value, str) else None
    except ValueError:
        number = None
    if number is None:
        raise APIError(400, f"'{name}' must be a number", param=name)
    return number


def _check_max_tokens_cap(max_tokens: Optional[int]) -> None:
    if max_tokens is not None and max_tokens > MAX_TOKENS_CAP:
        raise APIError(400, f"max_tokens must be at most {MAX_TOKENS_CAP}, got {max_tokens}", param="max_tokens")


class VoxtralAPI:
    """The route handlers and the configuration they share."""

    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str], policy: SourcePolicy,
                 max_upload_bytes: int, max_audio_seconds: Optional[float]):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.policy = policy
        self.max_upload_bytes = max_upload_bytes
        self.max_audio_seconds = max_audio_seconds
        self.created = int(time.time())

    # shared checks ------------------------------------------------------------------------
    def _authorized(self, headers) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def _authorize(self, request: Request) -> None:
        if not self._authorized(request.headers):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded audio to float32 16 kHz, within the duration limit. Runs in a worker thread."""
        if not data:
            raise AudioError("the audio is empty (0 bytes)")
        if len(data) > self.max_upload_bytes:
            raise APIError(413, f"the audio exceeds {self.max_upload_bytes} bytes", code="request_too_large")
        limit = self.max_audio_seconds
        too_long = APIError(400, f"the audio is longer than the server's {limit:g} s limit",
                            code="audio_too_long") if limit else None
        blocks = iter_audio(data)
        if limit and blocks.duration is not None and blocks.duration > limit + 0.5:
            raise too_long
        out, n = [], 0
        for block in blocks:
            n += block.shape[0]
            if limit and n > limit * SAMPLE_RATE:
                raise too_long
            out.append(block)
        return np.concatenate(out)

    async def _collect(self, job: Job, request: Request) -> list:
        """Wait for a job's results; a client that disconnects meanwhile cancels the job."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while True:
                event = await job.next_event()
                if isinstance(event, Finished):
                    return event.results
                if isinstance(event, Failed):
                    raise event.error
        finally:
            watcher.cancel()
            job.cancel()

    # routes -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        active, waiting = self.engine.load
        return JSONResponse({"status": "ok", "model": self.model_name, "active": active, "waiting": waiting})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mlx-voxtral"}
        ]})

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        if _media_type(request) not in ("", "application/json"):
            raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise APIError(400, "'model' must be a string", param="model")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens, temperature = check_options(max_tokens, body.get("temperature"), body.get("n", 1))
        _check_max_tokens_cap(max_tokens)
        stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        seed = body.get("seed")
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(400, "'stream' must be a boolean", param="stream")
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        try:
            seed = check_seed(seed)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="seed")
        encoded = await run_in_threadpool(audio_inputs, body.get("messages"), self.policy)
        audios = [await run_in_threadpool(self.decode, data) for data in encoded]
        job = self.engine.submit(audios, max_tokens=max_tokens, temperature=temperature, seed=seed)
        request_id, created = completion_id(), int(time.time())
        if stream:
            events = self._chat_events(job, request_id, created, len(audios), bool(options.get("include_usage")))
            return StreamingResponse(events, media_type="text/event-stream")
        results = await self._collect(job, request)
        return JSONResponse(completion_response(request_id, self.model_name, results, created).to_dict())

    async def _chat_events(self, job: Job, request_id: str, created: int, n_parts: int,
                           include_usage: bool) -> AsyncIterator[str]:
        def data(**kwargs) -> str:
            return sse(chunk(request_id, self.model_name, created, **kwargs).to_dict())

        try:
            yield data(role="assistant", content="")
            text = DeltaText()
            while True:
                event = await job.next_event()
                piece = text.add(event)
                if piece:
                    yield data(content=piece)
                elif isinstance(event, PartDone):
                    if event.result.finish_reason != "length" and event.index < n_parts - 1:
                        yield data(content=PART_SEPARATOR)
                    text.reset()
                elif isinstance(event, Finished):
                    yield data(finish=finish_reason(event.results))
                    if include_usage:
                        yield data(usage=Usage.from_results(event.results), choices=False)
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, Failed):
                    yield sse(api_error(event.error).body())
                    return
        finally:
            job.cancel()  # the client went away, or the job ended: either way it is done

    async def transcriptions(self, request: Request) -> Response:
        self._authorize(request)
        if _media_type(request) != "multipart/form-data":
            raise APIError(415, "Content-Type must be multipart/form-data", code="unsupported_media_type")
        async with request.form(max_files=1, max_fields=32, max_part_size=64 * 1024) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "'file' (an audio file upload) is required", param="file")
            for name in ("model", "language", "prompt", "response_format", "temperature", "stream"):
                if form.get(name) is not None and not isinstance(form.get(name), str):
                    raise APIError(400, f"'{name}' must be a form field, not a file", param=name)
            response_format = form.get("response_format") or "json"
            if response_format not in RESPONSE_FORMATS:
                raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                               param="response_format")
            temperature = check_temperature(_form_float(form.get("temperature"), "temperature") or 0.0)
            granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
            if any(g not in GRANULARITIES for g in granularities):
                raise APIError(400, "timestamp_granularities[] items must be 'word' or 'segment'",
                               param="timestamp_granularities")
            stream = _form_bool(form.get("stream"), "stream")
            if stream and response_format not in ("json", "text"):
                raise APIError(400, "stream=true works with response_format json or text",
                               param="response_format")
            language = form.get("language") or None
            data = await upload.read()
        audio = await run_in_threadpool(self.decode, data)
        job = self.engine.submit([audio], temperature=temperature)
        if stream:
            return StreamingResponse(self._transcription_events(job), media_type="text/event-stream")
        results = await self._collect(job, request)
        result = results[0]
        if response_format == "json":
            return JSONResponse({"text": result.text, "usage": _usage_tokens(results)})
        if response_format == "verbose_json":
            return JSONResponse(self._verbose(result, language, granularities, temperature))
        fmt = "txt" if response_format == "text" else response_format
        return PlainTextResponse(render(result, fmt))

    @staticmethod
    def _verbose(result, language: Optional[str], granularities: list, temperature: float) -> dict:
        body = {
            "task": "transcribe",
            "language": language or "unknown",  # the model does not report a language
            "duration": round(result.audio_duration, 3),
            "text": result.text,
            "segments": [
                {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "temperature": temperature}
                for i, s in enumerate(result.segments)
            ],
        }
        if "word" in granularities:
            body["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in result.words]
        return body

    async def _transcription_events(self, job: Job) -> AsyncIterator[str]:
        try:
            text = DeltaText()
            while True:
                event = await job.next_event()
                piece = text.add(event)
                if piece:
                    yield sse({"type": "transcript.text.delta", "delta": piece})
                elif isinstance(event, Finished):
                    result = event.results[0]
                    yield sse({"type": "transcript.text.done", "text": result.text,
                               "usage": _usage_tokens(event.results)})
                    return
                elif isinstance(event, Failed):
                    yield sse({"type": "error", **api_error(event.error).body()})
                    return
        finally:
            job.cancel()

    # realtime -----------------------------------------------------------------------------
    async def realtime(self, websocket: WebSocket) -> None:
        """OpenAI-Realtime-style transcription over a websocket (vLLM's Voxtral protocol).

        Client events: ``session.update`` (``model``; optional ``delay_ms``, top level or
        under ``session``), ``input_audio_buffer.append`` (``audio``: base64 PCM16 LE mono
        16 kHz), ``input_audio_buffer.commit`` (``final: true`` ends the audio). Server
        events: ``session.created``, ``transcription.delta``, ``transcription.done`` (with
        ``usage``) and ``error``. After ``transcription.done`` the next append starts a new
        transcription on the same connection.
        """
        if not self._authorized(websocket.headers):
            denial = APIError(401, "invalid or missing API key", code="invalid_api_key").response()
            try:
                await websocket.send_denial_response(denial)
            except RuntimeError:
                await websocket.close(code=1008)
            return
        await websocket.accept()
        await websocket.send_json({"type": "session.created", "id": f"sess-{uuid.uuid4().hex}",
                                   "created": int(time.time())})
        job: Optional[Job] = None
        delay_ms = None
        tasks: set[asyncio.Task] = set()

        async def error(message: str, code: str) -> None:
            await websocket.send_json({"type": "error", "error": {
                "message": message, "type": "invalid_request_error", "param": None, "code": code}})

        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await error("send JSON text messages, not binary frames", "invalid_event")
                    continue
                try:
                    event = json.loads(message["text"])
                except ValueError:
                    await error("the message is not valid JSON", "invalid_json")
                    continue
                kind = event.get("type") if isinstance(event, dict) else None
                try:
                    if kind == "session.update":
                        if job is not None:
                            raise InvalidRequestError("session.update is not allowed while audio is streaming")
                        delay_ms = self._session_delay(event, delay_ms)
                    elif kind == "input_audio_buffer.append":
                        samples = self._pcm16(event.get("audio"))
                        if job is None:
                            job = self._start_live(delay_ms, websocket, tasks)
                        job.append(samples)
                    elif kind == "input_audio_buffer.commit":
                        if job is None:
                            job = self._start_live(delay_ms, websocket, tasks)
                        if event.get("final"):
                            job.finish()
                            job = None
                    else:
                        await error(f"unknown event type {kind!r}", "unknown_event")
                except QueueFullError as e:
                    await error(str(e), "server_busy")
                except VoxtralError as e:
                    await error(str(e), "invalid_request")
        except WebSocketDisconnect:
            pass
        finally:
            if job is not None:
                job.cancel()
            for task in tasks:
                task.cancel()

    def _session_delay(self, event: dict, delay_ms):
        session = event.get("session") if isinstance(event.get("session"), dict) else event
        model = event.get("model", session.get("model"))
        if model is not None and not isinstance(model, str):
            raise InvalidRequestError("'model' must be a string")
        delay = session.get("delay_ms", delay_ms)
        self.engine.model.tokenizer.check_delay(delay)
        return delay

    def _pcm16(self, audio) -> np.ndarray:
        if not isinstance(audio, str):
            raise InvalidRequestError("input_audio_buffer.append needs 'audio': base64 PCM16 data")
        if len(audio) * 3 // 4 > self.max_upload_bytes:
            raise InvalidRequestError(f"the audio chunk exceeds {self.max_upload_bytes} bytes")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError("'audio' is not valid base64")
        if not data or len(data) % 2:
            raise InvalidRequestError("'audio' must be a non-empty whole number of 16-bit samples")
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0

    def _start_live(self, delay_ms, websocket: WebSocket, tasks: set) -> Job:
        job = self.engine.start_live(delay_ms=delay_ms)
        task = asyncio.create_task(self._forward(job, websocket))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return job

    async def _forward(self, job: Job, websocket: WebSocket) -> None:
        """A live job's events to the websocket."""
        text = DeltaText()
        try:
            while True:
                event = await job.next_event()
                piece = text.add(event)
                if piece:
                    await websocket.send_json({"type": "transcription.delta", "delta": piece})
                elif isinstance(event, Finished):
                    u = Usage.from_results(event.results)
                    await websocket.send_json({"type": "transcription.done", "text": event.results[0].text,
                                               "usage": {"prompt_tokens": u.prompt_tokens,
                                                         "completion_tokens": u.completion_tokens,
                                                         "total_tokens": u.total_tokens}})
                    return
                elif isinstance(event, Failed):
                    await websocket.send_json({"type": "error", **api_error(event.error).body()})
                    return
        except (WebSocketDisconnect, RuntimeError):  # the client is gone
            pass
        finally:
            job.cancel()


def create_app(
    engine_or_model,
    *,
    model_name: str = "default",
    api_key: Optional[str] = None,
    policy: Optional[SourcePolicy] = None,
    max_upload_bytes: int = 100 * 1024 * 1024,
    max_audio_seconds: Optional[float] = None,
    max_concurrency: int = 8,
    max_queue: int = 32,
    request_timeout: Optional[float] = 600.0,
) -> Starlette:
    """The Starlette app serving one model.

    Args:
        engine_or_model: an ``Engine`` (shared, not closed by the app) or a loaded model (the
            app makes an ``Engine`` with ``max_concurrency``, ``max_queue`` and
            ``request_timeout`` and closes it at shutdown).
        model_name: the id ``/v1/models`` lists and responses carry.
        api_key: if set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
        policy: which ``audio_url`` locations may be read; default: data URLs only.
        max_upload_bytes: limit on audio size (a JSON body may be 4/3 of it, for base64).
        max_audio_seconds: limit on audio duration (``None``: no limit).
    """
    owned = not isinstance(engine_or_model, Engine)
    engine = Engine(engine_or_model, max_concurrency, max_queue, request_timeout) if owned else engine_or_model
    policy = policy or SourcePolicy(local_root=None, allow_remote=False)
    policy = SourcePolicy(policy.local_root, policy.allow_remote, min(policy.max_bytes, max_upload_bytes),
                          policy.timeout)
    api = VoxtralAPI(engine, model_name, api_key, policy, max_upload_bytes, max_audio_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            await run_in_threadpool(engine.close)

    app = Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/audio/transcriptions", api.transcriptions, methods=["POST"]),
            WebSocketRoute("/v1/realtime", api.realtime),
        ],
        exception_handlers={HTTPException: _http_error_handler, APIError: _api_error_handler,
                            VoxtralError: _api_error_handler, Exception: _api_error_handler},
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes * 4 // 3 + 1024 * 1024)
    app.state.api = api
    app.state.engine = engine
    return app
