"""Decoding loops: offline ``transcribe`` and live ``stream_transcribe`` over one session.

Both run the same incremental machinery (``Session`` -> ``Stream``), so a file of hours
is transcribed with bounded memory and streamed audio gives exactly the offline tokens.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Optional, Union

import mlx.core as mx
import numpy as np

from .audio import SAMPLE_RATE, AudioSource, iter_audio
from .exceptions import AudioError
from .session import Session, StreamReset, TextDelta, check_temperature
from .timestamps import Segment, Word

# Offline audio is fed in blocks of this many seconds (bounds memory for long files).
BLOCK_SECONDS = 30.0

__all__ = [
    "Timings", "Transcription", "TextDelta", "Word", "StreamReset", "Done",
    "transcribe", "stream_transcribe", "async_stream_transcribe", "sample", "batch_step", "result",
]


@dataclass
class Timings:
    """Wall-clock seconds spent in each stage."""

    load: float = 0.0
    encode: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.prefill + self.decode


@dataclass
class Transcription:
    """Result of ``transcribe`` (and the final event of ``stream_transcribe``).

    ``token_ids`` are the raw generated ids, special tokens included (``[STREAMING_PAD]``,
    ``[STREAMING_WORD]``, EOS); ``text`` keeps only text tokens. ``words`` and
    ``segments`` carry times in seconds (see ``mlx_voxtral.timestamps``).
    """

    text: str
    token_ids: list[int]
    audio_duration: float
    delay_ms: int
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS), "end_of_audio" or "length" (max_tokens reached)
    text_tokens: int = 0  # generated text tokens (what max_tokens counts)
    words: list[Word] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    resets: int = 0
    timings: Timings = field(default_factory=Timings)

    @property
    def real_time_factor(self) -> float:
        """Audio seconds transcribed per wall-clock second."""
        return self.audio_duration / self.timings.total if self.timings.total else float("inf")

    @property
    def decode_tokens_per_sec(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.timings.decode if self.timings.decode else 0.0


@dataclass
class Done:
    """The last event of a stream: the whole transcription."""

    result: Transcription


def sample(logits: mx.array, temperature: float, key: Optional[mx.array] = None) -> mx.array:
    """Greedy argmax at temperature 0, otherwise a draw from ``softmax(logits / T)``."""
    logits = logits.astype(mx.float32)
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits * (1.0 / temperature), key=key)


def _encode(model, session: Session) -> bool:
    stream = session.stream
    encoded = False
    while (mel := stream.take_mel()) is not None:
        (embeds,) = model.embed_audio([mel], [stream.conv_caches], [stream.encoder_caches])
        mx.eval(embeds)
        stream.add_audio_embeddings(embeds)
        encoded = True
    return encoded


def run_session(session: Session, timings: Timings) -> Iterator:
    """Decode everything the session's audio allows so far, yielding its events.

    The next decoder step is queued (``mx.async_eval``) before the previous token is read
    back, so the host never waits idle between steps.
    """
    model = session.model
    clock = time.perf_counter()

    def lap() -> float:
        nonlocal clock
        now = time.perf_counter()
        dt, clock = now - clock, now
        return dt

    pending = None  # (stream, output position, lazy token) of the step in flight
    while True:
        if _encode(model, session):
            timings.encode += lap()
        queued = None
        # never queue a step behind a stale one: a restart may be on its way
        if not session.done and (pending is None or pending[0] is session.stream):
            step = session.next_step()
            if step is not None:
                stream = session.stream
                embeds, tokens = step
                prefill = not stream.prefilled
                logits = model([embeds], [tokens], [stream.decoder_caches], [stream.num_delay_tokens])
                token = sample(logits, session.temperature, session.next_key())
                stream.advance(embeds.shape[0], token)
                queued = (stream, stream.position - 1, token)
                if prefill:
                    mx.eval(token)
                    timings.prefill += lap()
                else:
                    mx.async_eval(token)
        processed = pending is not None
        if pending is not None:
            stream, position, token = pending
            token_id = token.item()
            timings.decode += lap()
            if stream is session.stream and not session.done:  # else stale after a restart
                yield from session.on_token(token_id, position)
        pending = queued
        if pending is not None:
            continue
        idle = _idle_events(session)
        if idle is None:
            if not processed:
                return  # waiting for more audio
            continue
        yield from idle
        if session.done:
            return


def _idle_events(session: Session) -> Optional[list]:
    """What to do when no decoder step can be queued: restart at the position limit, or
    end once all audio was decoded. None: nothing to do (more audio is needed)."""
    if session.done:
        return []
    if session.rollover_due:
        return session.rollover()
    if session.stream.audio_done:
        return session.end()
    return None


def batch_step(model, sessions: list[Session], timings: Optional[Timings] = None) -> list[list]:
    """One step for many sessions at once; returns each session's events.

    Pending audio of every session is encoded in one pass; then one decoder pass runs the
    next position of every session that has its input ready (a new session's prompt
    included). Sessions waiting for audio are left as they are. This is how the server
    decodes concurrent requests together.
    """
    timings = timings if timings is not None else Timings()
    events: list[list] = [[] for _ in sessions]
    t0 = time.perf_counter()
    encoding = [(s, m) for s in sessions if not s.done and (m := s.stream.take_mel()) is not None]
    if encoding:
        embeds = model.embed_audio(
            [m for _, m in encoding],
            [s.stream.conv_caches for s, _ in encoding],
            [s.stream.encoder_caches for s, _ in encoding],
        )
        mx.eval(embeds)
        for (s, _), e in zip(encoding, embeds):
            s.stream.add_audio_embeddings(e)
        t1 = time.perf_counter()
        timings.encode += t1 - t0
        t0 = t1
    ready, steps = [], []
    for i, s in enumerate(sessions):
        step = s.next_step() if not s.done else None
        if step is not None:
            ready.append(i)
            steps.append(step)
    if ready:
        streams = [sessions[i].stream for i in ready]
        logits = model(
            [e for e, _ in steps], [t for _, t in steps],
            [st.decoder_caches for st in streams], [st.num_delay_tokens for st in streams],
        )
        tokens = [
            sample(logits[j : j + 1], sessions[i].temperature, sessions[i].next_key())
            for j, i in enumerate(ready)
        ]
        mx.eval(tokens)
        for j, i in enumerate(ready):
            streams[j].advance(steps[j][0].shape[0], tokens[j])
            events[i] += sessions[i].on_token(tokens[j].item(), streams[j].position - 1)
        timings.decode += time.perf_counter() - t0
    for i, s in enumerate(sessions):
        if i not in ready and not s.stream.pending_tokens():
            events[i] += _idle_events(s) or []
    return events


def result(session: Session, timings: Timings) -> Transcription:
    """The ``Transcription`` of a session so far (complete once ``session.done``)."""
    return Transcription(
        text=session.text,
        token_ids=list(session.token_ids),
        audio_duration=session.duration,
        delay_ms=session.delay_ms,
        prompt_tokens=len(session.stream.prompt),
        finish_reason=session.finish_reason or "end_of_audio",
        text_tokens=session.n_text,
        words=list(session.words),
        segments=session.segments,
        resets=session.resets,
        timings=timings,
    )


def transcribe(
    model,
    audio: AudioSource,
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    progress: Optional[Callable[[float, Optional[float]], None]] = None,
) -> Transcription:
    """Transcribe a whole recording.

    Args:
        model: a model returned by ``mlx_voxtral.load``.
        audio: a path (or ``file://`` URL), encoded bytes, a binary file object, or
            float32 16 kHz samples.
        delay_ms: transcription delay (multiple of 80 ms, 80 to 2400); default from
            ``tekken.json`` (480 ms).
        temperature: 0 for greedy decoding (recommended), otherwise sampling.
        max_tokens: stop after this many text tokens (``finish_reason="length"``);
            ``None`` transcribes until the end of the audio (or EOS after it).
        seed: random seed for sampling.
        progress: called as ``progress(seconds_done, seconds_total or None)``.

    The file is decoded, resampled and transcribed block by block, so memory does not
    grow with its length.

    Raises:
        AudioError, UnsupportedAudioFormatError: unreadable, empty or non-finite audio.
        InvalidRequestError: bad delay, temperature or max_tokens.
    """
    session = Session(model, delay_ms, temperature, seed, max_tokens)
    timings = Timings(load=getattr(model, "load_time", 0.0))
    blocks = iter_audio(audio, block_seconds=BLOCK_SECONDS)
    for block in blocks:
        session.push(block)
        for _ in run_session(session, timings):
            pass
        if progress is not None:
            progress(session.duration, blocks.duration)
        if session.done:
            break
    if not session.done:
        session.finish()
        for _ in run_session(session, timings):
            pass
        if progress is not None:
            progress(session.duration, blocks.duration)
    return result(session, timings)


Event = Union[TextDelta, Word, StreamReset, Done]


def _chunk(samples) -> np.ndarray:
    chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
    if not np.isfinite(chunk).all():
        raise AudioError(f"the audio chunk contains {int((~np.isfinite(chunk)).sum())} NaN or infinite samples")
    return chunk


def stream_transcribe(
    model,
    chunks: Iterable[np.ndarray],
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
) -> Iterator[Event]:
    """Transcribe live audio: float32 16 kHz mono chunks of any size in, events out.

    Yields ``TextDelta`` (new text, as soon as decided), ``Word`` (a finished word with
    start/end seconds), ``StreamReset`` (the decoder restarted after EOS or at the
    position limit; the session goes on) and finally ``Done`` with the whole
    ``Transcription``. For the same audio the token ids equal offline ``transcribe``'s.
    """
    session = Session(model, delay_ms, temperature, seed, max_tokens)
    timings = Timings(load=getattr(model, "load_time", 0.0))
    for chunk in chunks:
        session.push(_chunk(chunk))
        yield from run_session(session, timings)
        if session.done:
            break
    if not session.done:
        if session.samples == 0:
            raise AudioError("the audio stream is empty (0 samples)")
        session.finish()
        yield from run_session(session, timings)
    yield Done(result(session, timings))


async def async_stream_transcribe(
    model,
    chunks: AsyncIterable[np.ndarray],
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
) -> AsyncIterator[Event]:
    """``stream_transcribe`` for an async iterable; model work runs in a worker thread.

    One dedicated thread does all of the session's MLX work (MLX streams are per thread).
    """
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-voxtral") as worker:
        session: Session = await loop.run_in_executor(
            worker, lambda: Session(model, delay_ms, temperature, seed, max_tokens)
        )
        timings = Timings(load=getattr(model, "load_time", 0.0))

        def work(chunk: Optional[np.ndarray]) -> list:
            if chunk is None:
                session.finish()
            else:
                session.push(chunk)
            return list(run_session(session, timings))

        async for chunk in chunks:
            for event in await loop.run_in_executor(worker, work, _chunk(chunk)):
                yield event
            if session.done:
                break
        if not session.done:
            if session.samples == 0:
                raise AudioError("the audio stream is empty (0 samples)")
            for event in await loop.run_in_executor(worker, work, None):
                yield event
        yield Done(result(session, timings))
