"""OpenAI-compatible HTTP and WebSocket API over the transcription ``Engine``.

Routes:

* ``POST /v1/chat/completions``: chat requests carrying audio (``audio_url``, ``input_audio``),
  answered with ``chat.completion`` or, with ``stream: true``, server-sent chunks.
* ``POST /v1/audio/transcriptions``: OpenAI's multipart upload; ``response_format`` json,
  text, srt, vtt or verbose_json; ``stream=true`` gives ``transcript.text.delta`` events.
* ``WS /v1/realtime``: live transcription in vLLM's dialect or OpenAI's Realtime API
  (transcription sessions, GA and beta); ``WS /v1/audio/transcriptions/realtime``: Mistral's
  realtime transcription API (``server.realtime``, one module per dialect).
* ``GET /v1/models``, ``GET /health``.
* ``GET /``: the live-captions page (``static/``: plain HTML, CSS and JS modules, no build
  step, nothing from other servers), which speaks vLLM's dialect at ``/v1/realtime``.

This module only parses, validates and shapes; all model work is the engine's. Errors are
OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``:

=====  ===========================================================================
400    malformed JSON / base64 / form, bad parameter (``param`` names it), unreadable
       or too long audio, a remote audio URL that could not be fetched, a ``Host``
       header the server does not answer to
401    missing or wrong API key
403    an audio_url the server may not read (local file outside the allowed folder,
       a remote URL without ``--allow-remote-urls``, off the allowed domains, or
       resolving to a private address)
404    unknown route;  405 wrong method;  408 the body did not arrive in time
413    request body or audio larger than the upload limit
415    wrong Content-Type, or audio in a format no decoder reads
429    no place in the engine (with ``Retry-After``), answered before the body is read
500    a fault of the server's own: a generic message, the connection kept
504    the request ran past the engine's request timeout
=====  ===========================================================================

The websocket answers bad events with an ``error`` event and goes on; it closes with 1008
after an ``idle_timeout`` or ``session_too_long`` error event, 1013 after ``server_busy``
(too many live sessions), 1011 after a fault of its own.

``temperature`` is the sampling temperature (0, or absent, is greedy decoding), with the
request's ``seed`` when given. ``max_tokens`` caps text tokens; above ``MAX_TOKENS_CAP`` it
is rejected. The request's ``model`` is not checked: one model is served, under the name
given to ``create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import itertools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Iterator, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from ..audio import SAMPLE_RATE, iter_audio
from ..audio_url import AudioTooLargeError, SourcePolicy
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
from ..exceptions import AudioError, AudioTooLongError, VoxtralError
from ..results import DeltaText, Failed, Finished, PartDone
from ..validate import check_seed, check_temperature
from ..writers import render
from . import BODY_TIMEOUT, LIVE_BACKLOG_SECONDS, LIVE_IDLE_TIMEOUT, MAX_AUDIO_SECONDS
from .errors import APIError, api_error
from .realtime.core import event_id, now
from .realtime.mistral import MistralSession
from .realtime.openai import OpenAISession
from .realtime.vllm import VLLMSession
from .engine import FEED_SECONDS, Engine, Job

log = logging.getLogger(__name__)

MAX_TOKENS_CAP = 100_000
CHAT_MAX_TEMPERATURE = 2.0  # OpenAI's bounds
TRANSCRIPTION_MAX_TEMPERATURE = 1.0
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MIN_AUDIO_SAMPLES = 160  # 10 ms: less is no speech (and a sign of a truncated file)
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
LIVE_SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # + the key: how a browser sends one


def guarded(handler):
    """A route that answers every exception itself: an error raised past the app would make
    uvicorn drop the (keep-alive) connection."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:  # noqa: BLE001 - each becomes its OpenAI-shaped answer
            return api_error(e).response()

    return route


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    return api_error(exc).response()


# middleware -----------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a 413 for HTTP bodies over ``max_bytes`` (declared or streamed), a
    408 for a body that has not fully arrived ``timeout`` seconds after it was first read."""

    def __init__(self, app, max_bytes: int, timeout: Optional[float] = BODY_TIMEOUT):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen, deadline, complete = 0, None, False

        async def limited_receive():
            nonlocal seen, deadline, complete
            if complete or self.timeout is None:
                message = await receive()
            else:
                deadline = deadline or time.monotonic() + self.timeout
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request body did not arrive within {self.timeout:g} s",
                                   code="request_timeout", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")


def host_name(header: str) -> Optional[str]:
    """The host of a ``Host`` header (no port, IPv6 brackets removed), lower case; None if
    malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        host, sep, rest = header[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return host
    host, _, port = header.partition(":")
    if port and not port.isdigit():
        return None
    return host or None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: answer only requests whose ``Host`` is one of ``allowed`` (any port),
    which keeps a web page from reaching a loopback server through DNS rebinding. ``"*"``
    allows every host; ``allow_ip_literals`` any IP address (a server bound to every
    interface is reached by its addresses, which a rebinding attack cannot forge)."""

    def __init__(self, app, allowed, allow_ip_literals: bool = False):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}
        self.allow_ip_literals = allow_ip_literals

    def permits(self, header: str) -> bool:
        if "*" in self.allowed:
            return True
        host = host_name(header)
        return host is not None and (host in self.allowed or (self.allow_ip_literals and _is_ip(host)))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.permits(header):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        error = APIError(400, "this server does not answer to that Host header", code="invalid_host")
        return await error.response()(scope, receive, send)


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


class _Budget:
    """Seconds of audio one request may still decode, over all its parts."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.claimed = 0.0  # seconds the containers state
        self.samples = 0  # samples decoded

    def error(self) -> AudioTooLongError:
        return AudioTooLongError(f"the audio is longer than the server's {self.seconds:g} s limit per request")

    def claim(self, seconds: Optional[float]) -> None:
        """Audio whose container says it lasts ``seconds``: refused before decoding."""
        if self.seconds is not None and seconds is not None:
            self.claimed += seconds
            if self.claimed > self.seconds:
                raise self.error()

    def metered(self, blocks) -> Iterator[np.ndarray]:
        for block in blocks:
            self.samples += block.shape[0]
            if self.seconds is not None and self.samples > (self.seconds + 0.1) * SAMPLE_RATE:
                raise self.error()
            yield block


class VoxtralAPI:
    """The route handlers and the configuration they share."""

    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str], policy: SourcePolicy,
                 max_upload_bytes: int, max_audio_seconds: Optional[float], *,
                 live_idle_timeout: Optional[float] = LIVE_IDLE_TIMEOUT,
                 max_live_seconds: Optional[float] = MAX_AUDIO_SECONDS,
                 live_backlog_seconds: float = LIVE_BACKLOG_SECONDS, allowed_origins=()):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.policy = policy
        self.max_upload_bytes = max_upload_bytes
        self.max_audio_seconds = max_audio_seconds
        self.live_idle_timeout = live_idle_timeout
        self.max_live_seconds = max_live_seconds
        self.live_backlog_seconds = live_backlog_seconds
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.created = int(time.time())
        # fetches wait on the network in a pool of their own, so slow remote servers cannot
        # hold the threads that read and decode everybody's uploads
        self.fetch_pool = ThreadPoolExecutor(8, thread_name_prefix="mlx-voxtral-fetch")
        self.read_pool = ThreadPoolExecutor(4, thread_name_prefix="mlx-voxtral-read")

    def close(self) -> None:
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.read_pool.shutdown(wait=False, cancel_futures=True)

    async def _in(self, pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # shared checks ------------------------------------------------------------------------
    def _authorized(self, headers) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._key_matches(key.strip())

    def _key_matches(self, key: str) -> bool:
        return hmac.compare_digest(key.encode(), self.api_key.encode())

    def _live_authorized(self, websocket: WebSocket) -> bool:
        """A websocket's key: ``Authorization: Bearer`` or, from a browser (which cannot set
        headers on a websocket and must not put a key in a URL), the subprotocol
        ``openai-insecure-api-key.<key>`` next to ``realtime``, as OpenAI's Realtime API
        takes it."""
        if self._authorized(websocket.headers):
            return True
        keys = [p[len(KEY_SUBPROTOCOL):] for p in _subprotocols(websocket) if p.startswith(KEY_SUBPROTOCOL)]
        return len(keys) == 1 and self._key_matches(keys[0])

    def _authorize(self, request: Request) -> None:
        if not self._authorized(request.headers):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def open_audio(self, encoded: list[bytes]) -> list:
        """Encoded audio parts to block iterators (float32 16 kHz), within the request's
        duration limit: durations the containers state are checked before anything is
        decoded, and each part's first block is decoded here so that unreadable audio is an
        error before the request starts. Runs in a worker thread."""
        budget = _Budget(self.max_audio_seconds)
        opened = []
        for data in encoded:
            if not data:
                raise AudioError("the audio is empty (0 bytes)")
            if len(data) > self.max_upload_bytes:
                raise AudioTooLargeError(f"the audio exceeds {self.max_upload_bytes} bytes")
            blocks = iter_audio(data, block_seconds=FEED_SECONDS)
            budget.claim(blocks.duration)
            opened.append(blocks)
        parts = []
        for blocks in opened:
            metered = budget.metered(blocks)
            head = [next(metered)]
            if head[0].shape[0] < MIN_AUDIO_SAMPLES:  # a truncated file, say
                head += list(itertools.islice(metered, 1))
                if sum(b.shape[0] for b in head) < MIN_AUDIO_SAMPLES:
                    raise AudioError(f"the audio is too short to transcribe (under {MIN_AUDIO_SAMPLES} samples "
                                     f"at {SAMPLE_RATE} Hz)")
            parts.append(itertools.chain(head, metered))
        return parts

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

    def _delay(self, value) -> Optional[int]:
        return None if value is None else self.engine.model.tokenizer.check_delay(value)

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
        if _media_type(request) != "application/json":
            raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
        with self.engine.reserve() as ticket:  # a place first: a full server reads no body
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object", code="invalid_json")
            if body.get("model") is not None and not isinstance(body["model"], str):
                raise APIError(400, "'model' must be a string", param="model")
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            max_tokens, temperature = check_options(max_tokens, body.get("temperature"), body.get("n", 1),
                                                    max_temperature=CHAT_MAX_TEMPERATURE)
            _check_max_tokens_cap(max_tokens)
            stream = body.get("stream", False)
            options = body.get("stream_options") or {}
            if not isinstance(stream, bool) and stream is not None:
                raise APIError(400, "'stream' must be a boolean", param="stream")
            if not isinstance(options, dict):
                raise APIError(400, "'stream_options' must be an object", param="stream_options")
            seed = check_seed(body.get("seed"))
            delay_ms = self._delay(body.get("delay_ms"))
            encoded = await self._in(self.fetch_pool, audio_inputs, body.get("messages"), self.policy)
            del raw, body
            audios = await self._in(self.read_pool, self.open_audio, encoded)
            job = self.engine.submit(audios, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                     delay_ms=delay_ms, ticket=ticket)
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
        media = _media_type(request)
        bodiless = request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers
        if media not in ("multipart/form-data", "application/x-www-form-urlencoded") and not (media == "" and bodiless):
            raise APIError(415, "Content-Type must be multipart/form-data", code="unsupported_media_type")
        with self.engine.reserve() as ticket:  # a place first: a full server reads no body
            async with request.form(max_files=1, max_fields=32, max_part_size=64 * 1024) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise APIError(400, "'file' (an audio file upload) is required", param="file")
                for name in ("model", "language", "prompt", "response_format", "temperature", "stream",
                             "delay_ms"):
                    if form.get(name) is not None and not isinstance(form.get(name), str):
                        raise APIError(400, f"'{name}' must be a form field, not a file", param=name)
                response_format = form.get("response_format") or "json"
                if response_format not in RESPONSE_FORMATS:
                    raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
                                   param="response_format")
                temperature = check_temperature(_form_float(form.get("temperature"), "temperature") or 0.0,
                                                TRANSCRIPTION_MAX_TEMPERATURE)
                delay_ms = self._delay(_form_float(form.get("delay_ms"), "delay_ms"))
                granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
                if any(g not in GRANULARITIES for g in granularities):
                    raise APIError(400, "timestamp_granularities[] items must be 'word' or 'segment'",
                                   param="timestamp_granularities")
                stream = _form_bool(form.get("stream"), "stream")
                if stream and response_format not in ("json", "text"):
                    raise APIError(400, "stream=true works with response_format json or text",
                                   param="response_format")
                language = form.get("language") or None
                if upload.size is not None and upload.size > self.max_upload_bytes:
                    raise APIError(413, f"the audio exceeds {self.max_upload_bytes} bytes", param="file",
                                   code="request_too_large")
                data = await upload.read(self.max_upload_bytes + 1)
            try:
                audios = await self._in(self.read_pool, self.open_audio, [data])
            except VoxtralError as e:
                e.param = e.param or "file"
                raise
            del data
            job = self.engine.submit(audios, temperature=temperature, delay_ms=delay_ms, ticket=ticket)
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
    def _origin_allowed(self, websocket: WebSocket) -> bool:
        """No ``Origin`` (not a browser), the server's own origin, or one allowed by flag."""
        origin = websocket.headers.get("origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins or "*" in self.allowed_origins:
            return True
        host = websocket.headers.get("host", "").lower()
        return bool(host) and origin in (f"http://{host}", f"https://{host}")

    async def _open_live(self, websocket: WebSocket) -> bool:
        """Authorize and accept a realtime websocket; False when it was refused. A client
        that offers subprotocols gets ``realtime`` if it offered it (a browser fails a
        handshake that answers none of those it offered), never its key."""
        if not self._live_authorized(websocket):
            await _deny(websocket, APIError(401, "invalid or missing API key", code="invalid_api_key"))
            return False
        if not self._origin_allowed(websocket):
            await _deny(websocket, APIError(403, "this origin may not open a realtime session",
                                            "permission_error", code="forbidden_origin"))
            return False
        await websocket.accept(subprotocol=LIVE_SUBPROTOCOL if LIVE_SUBPROTOCOL in _subprotocols(websocket) else None)
        return True

    async def realtime(self, websocket: WebSocket) -> None:
        """``/v1/realtime``: vLLM's dialect, or OpenAI's transcription sessions (GA or beta),
        as the client's first session event (or ``?intent=transcription``) says; see
        ``server.realtime``.

        Limits (every dialect): a session that sends nothing for ``live_idle_timeout``
        seconds while it has no transcription to wait for, or appends more than
        ``max_live_seconds`` of audio, is told so and closed (1008); beyond ``max_live``
        live sessions, a new one is told to retry (1013). Audio more than
        ``live_backlog_seconds`` ahead of the decoder pauses reading the socket (the
        client's sends block) until the decoder catches up.
        """
        if not await self._open_live(websocket):
            return
        openai = websocket.query_params.get("intent") == "transcription"
        session = OpenAISession(self, websocket) if openai else VLLMSession(self, websocket)
        created = {"type": "session.created", "event_id": event_id(), "id": session.id, "created": now(),
                   "session": {"type": "transcription", "id": session.id,
                               "object": "realtime.transcription_session"}}
        if openai:
            created["session"] = session.describe()
        await websocket.send_json(created)
        first = None
        if not openai:  # the first session event says which dialect the client speaks
            first = await session.next_event()
            if first is None:
                return
            kind, body = first.get("type"), first.get("session")
            if kind == "transcription_session.update" or (
                    kind == "session.update" and isinstance(body, dict) and ("type" in body or "audio" in body)):
                session = OpenAISession(self, websocket, beta=kind == "transcription_session.update")
        await session.run(first)

    async def mistral_realtime(self, websocket: WebSocket) -> None:
        """``/v1/audio/transcriptions/realtime``: Mistral's realtime transcription API (see
        ``server.realtime.mistral``), with the limits of ``realtime``."""
        if not await self._open_live(websocket):
            return
        model = websocket.query_params.get("model")
        session = MistralSession(self, websocket, model)
        await websocket.send_json({"type": "session.created", "session": session.describe()})
        await session.run()


# The live-captions page: static files of the package, no key needed (they hold no secret).
# Its policy keeps it to this server: nothing fetched from elsewhere, no inline script.
STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def live_page(request: Request) -> Response:
    """``GET /``: the live-captions page (``static/index.html``)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def _subprotocols(websocket: WebSocket) -> list[str]:
    """The subprotocols the client offered (the ASGI server parsed them)."""
    return list(websocket.scope.get("subprotocols") or [])


async def _deny(websocket: WebSocket, error: APIError) -> None:
    """Refuse a websocket before accepting it: the HTTP error where the server can send one,
    else a close (1008)."""
    try:
        await websocket.send_denial_response(error.response())
    except RuntimeError:
        await websocket.close(code=1008)


def create_app(
    engine_or_model,
    *,
    model_name: str = "default",
    api_key: Optional[str] = None,
    policy: Optional[SourcePolicy] = None,
    max_upload_bytes: int = 100 * 1024 * 1024,
    max_audio_seconds: Optional[float] = MAX_AUDIO_SECONDS,
    max_concurrency: int = 8,
    max_queue: int = 32,
    request_timeout: Optional[float] = 600.0,
    max_live: Optional[int] = None,
    live_idle_timeout: Optional[float] = LIVE_IDLE_TIMEOUT,
    max_live_seconds: Optional[float] = MAX_AUDIO_SECONDS,
    live_backlog_seconds: float = LIVE_BACKLOG_SECONDS,
    body_timeout: Optional[float] = BODY_TIMEOUT,
    allowed_hosts=LOOPBACK_HOSTS,
    allow_ip_hosts: bool = False,
    allowed_origins=(),
) -> Starlette:
    """The Starlette app serving one model.

    Args:
        engine_or_model: an ``Engine`` (shared, not closed by the app) or a loaded model (the
            app makes an ``Engine`` with ``max_concurrency``, ``max_queue``, ``max_live`` and
            ``request_timeout`` and closes it at shutdown).
        model_name: the id ``/v1/models`` lists and responses carry.
        api_key: if set, every route but ``/health`` and the page's static files needs
            ``Authorization: Bearer <key>`` (websockets: or the ``openai-insecure-api-key.<key>``
            subprotocol, a browser's only way).
        policy: which ``audio_url`` locations may be read; default: data URLs only.
        max_upload_bytes: limit on audio size (a JSON body may be 4/3 of it, for base64).
        max_audio_seconds: limit on a request's audio, summed over its parts (``None``: no
            limit).
        max_live: live sessions at once (default: half of ``max_concurrency``).
        live_idle_timeout: seconds a live session may send nothing (``None``: no limit).
        max_live_seconds: audio one live session may send (``None``: no limit).
        live_backlog_seconds: live audio buffered ahead of the decoder before the server
            stops reading the socket (at least 1).
        body_timeout: seconds for a request body to arrive (``None``: no limit).
        allowed_hosts: ``Host`` names answered (any port); ``("*",)`` answers all.
        allow_ip_hosts: also answer any IP address as ``Host`` (for a server bound to every
            interface).
        allowed_origins: browser origins (``"https://app.example"``) that may open the
            websocket besides the server's own.
    """
    if live_backlog_seconds < 1:
        raise ValueError("live_backlog_seconds must be at least 1 (a stream needs some audio ahead)")
    owned = not isinstance(engine_or_model, Engine)
    engine = (Engine(engine_or_model, max_concurrency, max_queue, request_timeout, max_live=max_live)
              if owned else engine_or_model)
    policy = policy or SourcePolicy(local_root=None, allow_remote=False)
    policy = dataclasses.replace(policy, max_bytes=min(policy.max_bytes, max_upload_bytes))
    api = VoxtralAPI(engine, model_name, api_key, policy, max_upload_bytes, max_audio_seconds,
                     live_idle_timeout=live_idle_timeout, max_live_seconds=max_live_seconds,
                     live_backlog_seconds=live_backlog_seconds, allowed_origins=allowed_origins)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        api.close()
        if owned:
            await run_in_threadpool(engine.close)

    app = Starlette(
        routes=[
            Route("/health", guarded(api.health), methods=["GET"]),
            Route("/v1/models", guarded(api.models), methods=["GET"]),
            Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
            Route("/v1/audio/transcriptions", guarded(api.transcriptions), methods=["POST"]),
            WebSocketRoute("/v1/realtime", api.realtime),
            WebSocketRoute("/v1/audio/transcriptions/realtime", api.mistral_realtime),
            Route("/", live_page, methods=["GET", "HEAD"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: _api_error_handler, Exception: _api_error_handler},
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes * 4 // 3 + 1024 * 1024, timeout=body_timeout)
    app.add_middleware(HostCheck, allowed=allowed_hosts, allow_ip_literals=allow_ip_hosts)
    app.state.api = api
    app.state.engine = engine
    return app
