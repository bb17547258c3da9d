"""What every realtime dialect shares: a websocket's audio in, engine jobs, text out.

A live session is a websocket and a sequence of turns (utterances) on it. Each turn is one
live engine job: audio appended in the session's input format is decoded, resampled to
16 kHz with soxr exactly as ``transcribe`` resamples a file at that rate (streamed soxr is
bit-identical to resampling the whole signal, however the audio is chunked), and decoded as
it arrives; ending the turn (the dialect's commit, flush or end) lets its decoder finish,
and the turn's final text equals offline ``transcribe`` of the same samples wherever
README's guarantees say a stream equals offline. Deltas are append-only, never empty and
never part of a UTF-8 character; joined, they are the final text.

A dialect (``vllm``, ``openai``, ``mistral``) subclasses ``LiveSession``: it parses its
client events into calls of ``append``, ``end_turn``, ``clear_turn`` and session options,
and renders the turn events (``on_delta``, ``on_done``) and errors in its own terms.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import json
import time
import uuid
from typing import Optional

import numpy as np
import soxr
from starlette.websockets import WebSocket, WebSocketDisconnect

from ...audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE
from ...chat import Usage
from ...exceptions import InvalidRequestError, VoxtralError
from ...results import DeltaText, Failed, Finished, Provisional, Transcription, Word
from ..engine import Job, QueueFullError
from ..errors import APIError, api_error, log
from .vad import VoiceActivity


def _g711_table(law: str) -> np.ndarray:
    """The 256 G.711 code words as 16-bit linear samples (ITU-T G.711, as libsndfile
    decodes them), scaled to [-1, 1) like every other integer format."""
    codes = np.arange(256, dtype=np.int32)
    if law == "mulaw":
        u = ~codes & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        linear = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    else:
        a = codes ^ 0x55
        seg = (a & 0x70) >> 4
        t = (a & 0x0F) << 4
        t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
        linear = np.where(a & 0x80, t, -t)
    return (linear / 32768.0).astype(np.float32)


# encoding -> (numpy dtype of a sample, scale to [-1, 1)) or a G.711 law
ENCODINGS = {
    "pcm_s16le": ("<i2", 1 / 32768.0),
    "pcm_s32le": ("<i4", 1 / 2147483648.0),
    "pcm_f16le": ("<f2", None),
    "pcm_f32le": ("<f4", None),
    "pcm_mulaw": ("u1", "mulaw"),
    "pcm_alaw": ("u1", "alaw"),
}


class AudioFormat:
    """How a session's audio arrives: ``encoding`` (one of ``ENCODINGS``) at ``rate`` Hz, mono."""

    def __init__(self, encoding: str = "pcm_s16le", rate: int = SAMPLE_RATE, param: str = "audio_format"):
        if encoding not in ENCODINGS:
            raise InvalidRequestError(f"unsupported audio encoding {str(encoding)[:32]!r}; "
                                      f"supported: {', '.join(ENCODINGS)}", param)
        if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InvalidRequestError(f"the sample rate must be an integer from {MIN_SAMPLE_RATE} to "
                                      f"{MAX_SAMPLE_RATE} Hz, got {str(rate)[:32]}", param)
        self.encoding, self.rate = encoding, rate
        dtype, scale = ENCODINGS[encoding]
        self._dtype = np.dtype(dtype)
        self._table = _g711_table(scale) if isinstance(scale, str) else None
        self._scale = scale if isinstance(scale, float) else None

    def decode(self, data: bytes, param: str = "audio") -> np.ndarray:
        """float32 samples at ``rate`` from raw bytes (a whole number of samples)."""
        if not data or len(data) % self._dtype.itemsize:
            raise InvalidRequestError(f"the audio must be a non-empty whole number of {self.encoding} samples "
                                      f"({self._dtype.itemsize} bytes each)", param)
        raw = np.frombuffer(data, self._dtype)
        if self._table is not None:
            return self._table[raw]
        audio = raw.astype(np.float32)
        if self._scale is not None:
            audio *= np.float32(self._scale)
        elif not np.isfinite(audio).all():
            raise InvalidRequestError("the audio contains NaN or infinite samples", param)
        return audio

    def resampler(self) -> Optional[soxr.ResampleStream]:
        """The resampler to 16 kHz ``audio.AudioBlocks`` uses for a file at this rate."""
        if self.rate == SAMPLE_RATE:
            return None
        return soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")


def event_id() -> str:
    return f"event_{uuid.uuid4().hex[:24]}"


class Turn:
    """One utterance: a live engine job, its resampler and its text so far."""

    def __init__(self, job: Job, resampler: Optional[soxr.ResampleStream], offset: float, delay_ms: int):
        self.job = job
        self.id = f"item_{uuid.uuid4().hex[:24]}"
        self.resampler = resampler
        self.offset = offset  # seconds of the session's audio before this turn
        self.delay_ms = delay_ms
        self.samples = 0  # 16 kHz samples given to the job
        self.text = DeltaText()
        self.ended = False

    def append(self, audio: np.ndarray) -> None:
        out = audio if self.resampler is None else self.resampler.resample_chunk(audio)
        if out.shape[0]:
            self.samples += out.shape[0]
            self.job.append(out)

    def end(self) -> None:
        if self.resampler is not None:
            self.append_tail()
        self.ended = True
        self.job.finish()

    def append_tail(self) -> None:
        tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.shape[0]:
            self.samples += tail.shape[0]
            self.job.append(tail)


class LiveSession(abc.ABC):
    """One realtime websocket in some dialect; see the module docstring.

    Subclasses set ``audio_format`` and ``delay_ms`` from their session events and implement
    ``handle`` (one client event), ``send_error``, ``on_delta`` and ``on_done``.
    """

    def __init__(self, api, websocket: WebSocket):
        self.api, self.websocket = api, websocket
        self.id = f"sess_{uuid.uuid4().hex[:24]}"
        self.audio_format = AudioFormat()
        self.delay_ms: Optional[int] = None
        self.provisional_delay_ms: Optional[int] = None  # dual delay's faster delay, when on
        self.turn: Optional[Turn] = None  # the turn receiving audio
        self.tasks: set[asyncio.Task] = set()  # forwarding the events of turns
        self.seconds = 0.0  # audio appended over the whole session
        self.closing = False  # the client ended the session: close once every turn is done
        self.vad: Optional[VoiceActivity] = None  # server-side turn detection, when asked for
        self._vad_resampler: Optional[soxr.ResampleStream] = None

    # the dialect's part -------------------------------------------------------------------
    @abc.abstractmethod
    async def handle(self, event: dict) -> bool:
        """Act on one client event; False when the session has been closed."""

    @abc.abstractmethod
    async def send_error(self, error: APIError, client_event: Optional[dict] = None) -> None:
        """Render ``error`` (and the client event that caused it) in the dialect's terms."""

    @abc.abstractmethod
    async def on_delta(self, turn: Turn, delta: str) -> None:
        """Send ``delta``, the next append-only piece of the turn's text."""

    @abc.abstractmethod
    async def on_done(self, turn: Turn, result: Transcription, usage: Usage) -> None:
        """The turn is complete: send its final ``result`` and ``usage``."""

    async def on_provisional(self, turn: Turn, text: str) -> None:
        """A hook (dual delay): ``text``, the faster delay's text beyond the final text so
        far, replaces the previous provisional text."""

    async def on_word(self, turn: Turn, word: Word) -> None:
        """A hook: the decoder finished ``word`` (its times in seconds of the turn's audio)."""

    async def on_failed(self, turn: Turn, error: BaseException) -> None:
        await self.send_error(api_error(error))

    async def on_speech_started(self, turn: Turn, ms: int) -> None:
        """Turn detection started ``turn`` (its audio from ``ms`` of the session)."""

    async def on_speech_stopped(self, turn: Turn, ms: int) -> None:
        """Turn detection ended ``turn`` (its audio up to ``ms``)."""

    def detect_turns(self, vad: Optional[VoiceActivity]) -> None:
        """Turn detection on (``vad``) or off: with it, the audio is resampled for the whole
        session, judged frame by frame, and only speech (with its padding) reaches a turn."""
        self.vad = vad
        self._vad_resampler = self.audio_format.resampler() if vad is not None else None

    # options ------------------------------------------------------------------------------
    def check_delay(self, value, param: str = "delay_ms") -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"'{param}' must be a number of milliseconds", param)
        try:
            return self.api.engine.model.tokenizer.check_delay(value)
        except VoxtralError as e:
            raise InvalidRequestError(str(e), param) from None

    def set_provisional(self, value, param: str = "provisional_delay_ms") -> None:
        """Dual delay on (a delay in ms shorter than the session's) or off (None or 0)."""
        if value is None or (value == 0 and not isinstance(value, bool)):
            self.provisional_delay_ms = None
            return
        delay = self.check_delay(value, param)
        try:
            self.api.engine.check_provisional(self.delay_ms, delay, param)
        except VoxtralError as e:
            raise InvalidRequestError(str(e), param) from None
        self.provisional_delay_ms = delay

    def check_idle(self, what: str) -> None:
        if self.turn is not None:
            raise InvalidRequestError(f"{what} is not allowed while audio is streaming; end the turn first")

    @property
    def effective_delay_ms(self) -> int:
        return self.api.engine.model.tokenizer.check_delay(self.delay_ms)

    # audio and turns ------------------------------------------------------------------------
    def decode_base64(self, audio, param: str = "audio") -> bytes:
        if not isinstance(audio, str):
            raise InvalidRequestError(f"'{param}' must be base64 audio data", param)
        if len(audio) * 3 // 4 > self.api.max_upload_bytes:
            raise InvalidRequestError(f"the audio chunk exceeds {self.api.max_upload_bytes} bytes", param)
        try:
            return base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"'{param}' is not valid base64", param) from None

    async def append(self, data: bytes, param: str = "audio") -> bool:
        """Append raw audio to the current turn (starting one); False when the session had
        to be closed (it passed the server's limit)."""
        audio = self.audio_format.decode(data, param)
        seconds = audio.shape[0] / self.audio_format.rate
        limit = self.api.max_live_seconds
        if limit is not None and self.seconds + seconds > limit:
            await self.close_with(APIError(400, f"the session's audio passed the server's {limit:g} s limit",
                                           code="session_too_long"), 1008)
            return False
        if self.vad is not None:
            self.seconds += seconds
            return await self._detect(audio)
        turn = self.start_turn()  # its offset: the audio before this chunk
        self.seconds += seconds
        turn.append(audio)
        await self._backpressure(turn)
        return True

    async def _detect(self, audio: np.ndarray) -> bool:
        if self._vad_resampler is not None:
            audio = self._vad_resampler.resample_chunk(audio)
        for event in self.vad(audio):
            if event[0] == "start":
                turn = self.start_turn(event[1] / 1000)
                turn.append(event[2])
                await self.on_speech_started(turn, event[1])
            elif event[0] == "audio" and self.turn is not None:
                self.turn.append(event[1])
            elif event[0] == "stop" and self.turn is not None:
                turn, self.turn = self.turn, None
                turn.end()
                await self.on_speech_stopped(turn, event[1])
        if self.turn is not None:
            await self._backpressure(self.turn)
        return True

    async def _backpressure(self, turn: Turn) -> None:
        job = turn.job
        while job.backlog > self.api.live_backlog_seconds and not (job.closed or job.cancelled):
            await asyncio.sleep(0.02)  # the socket is not read meanwhile

    def start_turn(self, offset: Optional[float] = None) -> Turn:
        """The turn receiving audio, started (with its engine place) if need be; ``offset``:
        where its audio starts, in seconds of the session (default: the audio so far)."""
        if self.turn is not None and (self.turn.job.closed or self.turn.job.cancelled):  # it failed
            self.turn = None
        if self.turn is None:
            ticket = self.api.engine.reserve(live=True)
            job = self.api.engine.start_live(delay_ms=self.delay_ms, ticket=ticket,
                                             provisional_delay_ms=self.provisional_delay_ms)
            resampler = self.audio_format.resampler() if self.vad is None else None
            self.turn = Turn(job, resampler, self.seconds if offset is None else offset, self.effective_delay_ms)
            task = asyncio.create_task(self.forward(self.turn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.on_turn_started(self.turn)
        return self.turn

    def on_turn_started(self, turn: Turn) -> None:
        """A hook: a turn has started (its first audio arrived)."""

    def end_turn(self) -> Optional[Turn]:
        """The client ends the current turn (its text follows as the decoder finishes); None
        if none. Turn detection then waits for the next speech."""
        turn, self.turn = self.turn, None
        if self.vad is not None:
            rest = self.vad.flush()
            if turn is not None and rest is not None:
                turn.append(rest)
            self.vad.stop()
        if turn is not None:
            turn.end()
        return turn

    def clear_turn(self) -> None:
        """Drop the current turn and its audio."""
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.job.cancel()

    def finish_session(self) -> None:
        """The client ended the session: end the turn; the connection closes once every
        turn's text is out."""
        self.closing = True
        self.end_turn()

    async def forward(self, turn: Turn) -> None:
        """A turn's events to the websocket."""
        job = turn.job
        try:
            while True:
                event = await job.next_event()
                piece = turn.text.add(event)
                if piece:
                    await self.on_delta(turn, piece)
                elif isinstance(event, Word):
                    await self.on_word(turn, event)
                elif isinstance(event, Provisional):
                    await self.on_provisional(turn, event.text)
                elif isinstance(event, Finished):
                    await self.on_done(turn, event.results[0], Usage.from_results(event.results))
                    return
                elif isinstance(event, Failed):
                    if not job.cancelled or self.turn is turn:
                        await self.on_failed(turn, event.error)
                    return
        except (WebSocketDisconnect, RuntimeError):  # the client is gone
            pass
        finally:
            job.cancel()

    # the connection -------------------------------------------------------------------------
    def stop(self) -> None:
        if self.turn is not None:
            self.turn.job.cancel()
            self.turn = None
        for task in list(self.tasks):
            task.cancel()

    async def close_with(self, error: APIError, code: int) -> None:
        """Stop everything, send ``error`` as the last event, close with ``code``."""
        self.stop()
        await self.send_error(error)
        await self.websocket.close(code=code)

    async def receive(self) -> Optional[dict]:
        """The next message, or None after an idle timeout (then the session is closed)."""
        idle = self.api.live_idle_timeout
        waiting = self.turn is None and self.tasks  # a transcription is finishing: not idle
        if idle is None or waiting:
            return await self.websocket.receive()
        try:
            return await asyncio.wait_for(self.websocket.receive(), idle)
        except asyncio.TimeoutError:
            await self.close_with(APIError(400, f"no event for {idle:g} s: the session is closed",
                                           code="idle_timeout"), 1008)
            return None

    async def next_event(self) -> Optional[dict]:
        """The next client event (a JSON object); errors for anything else are sent and
        skipped. None: the client is gone or the session was closed."""
        while True:
            message = await self.receive()
            if message is None or message["type"] == "websocket.disconnect":
                return None
            if message.get("text") is None:
                await self.send_error(APIError(400, "send JSON text messages, not binary frames",
                                               code="invalid_event"))
                continue
            try:
                event = json.loads(message["text"])
            except (ValueError, RecursionError):
                await self.send_error(APIError(400, "the message is not valid JSON", code="invalid_json"))
                continue
            if not isinstance(event, dict):
                await self.send_error(APIError(400, "an event must be a JSON object with a 'type'",
                                               code="invalid_request"))
                continue
            return event

    async def run(self, first: Optional[dict] = None) -> None:
        """Serve the connection until the client leaves or the session is closed; ``first``:
        an event already read (the one that chose the dialect)."""
        try:
            event = first
            while True:
                if event is None:
                    event = await self.next_event()
                    if event is None:
                        return
                try:
                    if not await self.handle(event):
                        return
                except QueueFullError as e:
                    await self.close_with(APIError(429, str(e), "rate_limit_error", code="server_busy"), 1013)
                    return
                except VoxtralError as e:
                    error = api_error(e)
                    await self.send_error(error, event)
                event = None
                if self.closing:  # the rest is the turns' text; then the socket closes
                    while self.tasks:
                        await asyncio.wait(set(self.tasks))
                    with contextlib.suppress(Exception):
                        await self.websocket.close(code=1000)
                    return
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-send
            pass
        except Exception as e:  # noqa: BLE001 - a fault of ours: say so, close, keep serving
            log.error("realtime session failed", exc_info=e)
            with contextlib.suppress(Exception):
                await self.close_with(APIError(500, "internal server error", "server_error"), 1011)
        finally:
            self.stop()


def unknown_event(kind) -> APIError:
    return APIError(400, f"unknown event type {str(kind)[:64]!r}", param="type", code="unknown_event")


def now() -> int:
    return int(time.time())
