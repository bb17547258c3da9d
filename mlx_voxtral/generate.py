"""The decode driver (``Batch``) and the loops over it: ``transcribe``, ``stream_transcribe``.

One driver runs every transcription, whatever its shape: a file (``transcribe``), live audio
(``stream_transcribe``) and every request and live session of the server (its engine) are
sessions in a ``Batch``; one stream is a batch of one. A step of the batch

1. encodes, in one pass over the batch's rows, the audio that arrived for every session whose
   decoder is about to run out of audio embeddings (at most ``encode_tokens`` tokens per row,
   so that a long upload never holds up the live streams beside it);
2. runs the prompt of every stream that has the audio for it;
3. runs one decoder position for every stream whose input is ready, all rows in one pass, and
   samples their tokens in one call;
4. dispatches all of it (``mx.async_eval``) and only then reads the previous step's tokens
   back: the one host read of a step. The next step's inputs are this step's tokens, still
   lazy, so the host never waits for the accelerator between steps.

A token read back can end a session or restart its decoder (see ``session.py``); the work
already dispatched for it is then dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .audio import AudioSource, iter_audio
from .exceptions import AudioError, InvalidRequestError
from .results import Done, Event, FileResult, StreamReset, TextDelta, Timings, Transcription, Word
from .sample import Sampler, sample
from .session import Session
from .validate import check_samples

# Offline audio is fed in blocks of this many seconds (bounds memory for long files).
BLOCK_SECONDS = 30.0
# mx.clear_cache() every this many steps, as mlx-lm's generation loops do
CLEAR_CACHE_STEPS = 256

__all__ = [
    "Batch", "Timings", "Transcription", "TextDelta", "Word", "StreamReset", "Done",
    "transcribe", "transcribe_many", "stream_transcribe", "async_stream_transcribe", "result",
]


# mlx-lm's generate.generation_stream and wired_limit, written here: importing mlx_lm.generate
# imports transformers, 3.4 s on a 2-core x86 machine, paid by every `mlx-voxtral transcribe`.
@functools.lru_cache(maxsize=None)
def generation_stream() -> mx.ThreadLocalStream:
    """A stream of the default device for the decode work (one per thread)."""
    return mx.new_thread_local_stream(mx.default_device())


@contextlib.contextmanager
def wired_limit():
    """Keep the model's memory wired while decoding, where the device reports a recommended
    working set (Metal); elsewhere nothing."""
    limit = mx.device_info().get("max_recommended_working_set_size")
    if not limit:
        yield
        return
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)


class _Flight:
    """The work of one step: a token per (session, stream, position), read back together."""

    def __init__(self):
        self.records: list[tuple[Session, object, int, int]] = []
        self._arrays: list[mx.array] = []
        self._size = 0
        self.tokens: Optional[mx.array] = None

    def add(self, tokens: mx.array, records: list[tuple[Session, object, int, int]]) -> None:
        """``tokens`` ``[n]``, and for each ``(session, stream, position, index)`` the token of
        ``tokens[index]`` that ``session``'s ``stream`` makes at ``position``."""
        self.records += [(s, st, p, self._size + i) for s, st, p, i in records]
        self._arrays.append(tokens)
        self._size += tokens.shape[0]

    def dispatch(self) -> None:
        self.tokens = self._arrays[0] if len(self._arrays) == 1 else mx.concatenate(self._arrays)
        mx.async_eval(self.tokens)

    def sessions(self) -> set:
        return {r[0] for r in self.records}


_GREEDY = Sampler()


class Batch:
    """Sessions decoded together (see the module docstring).

    Args:
        model: a model from ``mlx_voxtral.load``.
        encode_tokens: most audio tokens (80 ms each) a row encodes in one step; default and
            maximum ``model.encode_tokens``.
        profile: evaluate each stage before timing it (exact per-stage timings, at the cost of
            a host sync per stage; for benchmarks).
    """

    def __init__(self, model, encode_tokens: Optional[int] = None, profile: bool = False):
        self.model = model
        self.cache = model.make_cache(model.tokenizer.max_prompt_length)
        self.encode_tokens = min(encode_tokens or model.encode_tokens, model.encode_tokens)
        self.profile = profile
        self.sessions: list[Session] = []
        self._rows: list = []  # the stream each row's caches hold (a restart makes a new one)
        self._inflight: Optional[_Flight] = None
        self.steps = 0
        self.host_reads = 0  # token reads (each waits for the accelerator)
        self.max_rows = 0
        # the last step's work: encoder rows, prompts, decoded rows, and the seconds spent
        # building and dispatching its graphs (what the host costs a step, on any device)
        self.last_step = {"encoded": 0, "prompts": 0, "decoded": 0, "build_s": 0.0}
        self.encoded_tokens = 0  # audio tokens run through the encoder, over all steps
        self._zeros: dict = {}
        self._leaders: dict[Session, Session] = {}  # dual delay: follower -> leader
        self._shared: dict[Session, tuple] = {}  # follower -> (its stream, the leader's) sharing

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: Session, follows: Optional[Session] = None) -> None:
        """Take ``session`` in (a new row).

        ``follows``: dual delay. ``session`` (a faster delay) then reuses the audio
        embeddings of ``follows`` (its leader, a session of this batch with a slower delay)
        instead of running the encoder itself: the encoder does not depend on the delay
        (the left pad is fixed, the encoder causal), so one pass serves both. Both must be
        pushed the same samples, and join before any of their audio is encoded. When the
        leader restarts its decoder, the follower restarts on the leader's new stream
        (``Session.follow``); when the follower restarts on its own, it runs the encoder
        itself until the leader's next restart. Removing the leader removes its followers.
        """
        if session in self.sessions:
            raise ValueError("the session is in the batch already")
        if follows is not None:
            if follows not in self.sessions or follows in self._leaders:
                raise ValueError("a follower follows a leader of this batch (not another follower)")
            if session.stream.embedded or follows.stream.embedded or not follows.followable \
                    or session.samples != follows.samples:
                raise ValueError("a follower joins its leader before any audio is encoded, with the same samples")
            self._leaders[session] = follows
            self._shared[session] = (session.stream, follows.stream)
        self.cache.add_row()
        self.sessions.append(session)
        self._rows.append(session.stream)
        self.max_rows = max(self.max_rows, len(self.sessions))

    def remove(self, session: Session) -> None:
        """Drop ``session`` (finished or abandoned), and its followers; its pending tokens
        are ignored."""
        for follower in [f for f, leader in self._leaders.items() if leader is session]:
            self.remove(follower)
        self._leaders.pop(session, None)
        self._shared.pop(session, None)
        i = self.sessions.index(session)
        self.cache.remove_row(i)
        last = len(self.sessions) - 1
        self.sessions[i], self._rows[i] = self.sessions[last], self._rows[last]
        self.sessions.pop()
        self._rows.pop()

    def _attached(self, follower: Session) -> bool:
        """The follower's stream takes its leader's embeddings (neither restarted alone)."""
        leader = self._leaders[follower]
        mine, theirs = self._shared[follower]
        return mine is follower.stream and theirs is leader.stream

    def _follow_restarts(self) -> dict[Session, list]:
        """Followers whose leader restarted restart on its new stream (see ``add``)."""
        events: dict[Session, list] = {}
        for follower, leader in self._leaders.items():
            if follower.done or leader.done or self._shared[follower][1] is leader.stream:
                continue
            if leader.followable and leader.samples == follower.samples:
                events[follower] = follower.follow(leader)
                self._shared[follower] = (follower.stream, leader.stream)
            else:  # cannot line up with this stream: the follower encodes alone until the next
                self._shared[follower] = (None, leader.stream)
        return events

    def in_flight(self, session: Session) -> bool:
        return self._inflight is not None and session in self._inflight.sessions()

    # one step ---------------------------------------------------------------------------
    def step(self) -> tuple[dict[Session, list], bool]:
        """Dispatch the next work of every session, then read the previous step's tokens.

        Returns each session's new events and whether anything happened (False: every session
        waits for audio, or is done).
        """
        with mx.stream(generation_stream()):
            restarted = self._follow_restarts() if self._leaders else {}
            for i, s in enumerate(self.sessions):
                if s.stream is not self._rows[i]:  # the session restarted its decoder
                    self.cache.reset_row(i)
                    self._rows[i] = s.stream
            flight = self._dispatch()
            events = self._read()
            self._inflight = flight
            progressed = flight is not None or events is not None or bool(restarted)
            events = events or {}
            for s, evs in restarted.items():
                events[s] = evs + events.get(s, [])
            waiting = flight.sessions() if flight is not None else set()
            for s in self.sessions:
                if s not in waiting:
                    idle = _idle_events(s)
                    if idle is not None:
                        progressed = True
                        if idle:
                            events.setdefault(s, []).extend(idle)
        self.steps += 1
        if self.steps % CLEAR_CACHE_STEPS == 0:
            mx.clear_cache()
        return events, progressed

    def _lap(self, start: float, stage: str, sessions, arrays=None) -> float:
        if self.profile and arrays is not None:
            mx.eval(arrays)
        now = time.perf_counter()
        for s in sessions:
            t = s.timings
            setattr(t, stage, getattr(t, stage) + now - start)
        return now

    def _zero(self, shape: tuple, dtype) -> mx.array:
        key = (shape, dtype)
        if key not in self._zeros:
            self._zeros[key] = mx.zeros(shape, dtype)
        return self._zeros[key]

    def _dispatch(self) -> Optional[_Flight]:
        model, sessions = self.model, self.sessions
        clock = start = time.perf_counter()
        last = self.last_step = {"encoded": 0, "prompts": 0, "decoded": 0, "build_s": 0.0}
        # 1. the encoder, for rows about to run out of audio embeddings
        # (an attached follower about to run out makes its leader encode, for both)
        encode = {}
        attached = {f: leader for f, leader in self._leaders.items() if self._attached(f)}
        for r, s in enumerate(sessions):
            st = s.stream
            if s.done or s.rollover_due or st.buffered >= st.next_length():
                continue
            if s in attached:
                s = attached[s]
                r, st = sessions.index(s), s.stream
                if s.done or s.rollover_due:
                    continue
            n = min(st.pending_tokens(), self.encode_tokens)
            if n:
                encode[r] = n
        if encode:
            embeds = self._encode(encode)
            for f, leader in attached.items():
                e = embeds.get(sessions.index(leader))
                if e is not None:
                    self._share(f, leader, e)
            last["encoded"] = len(encode)
            self.encoded_tokens += sum(e.shape[0] for e in embeds.values())
            clock = self._lap(clock, "encode", [sessions[r] for r in encode], list(embeds.values()))
        flight = _Flight()
        # 2. prompts
        prompted = set()
        for r, s in enumerate(sessions):
            if s.done or s.stream.prefilled:
                continue
            step = s.next_step()
            if step is None:
                continue
            st, (embeds, prompt) = s.stream, step
            logits = model(embeds[None], mx.array([prompt], dtype=mx.uint32), self.cache, slice(r, r + 1),
                           [len(prompt)], [st.num_delay_tokens])
            token = s.sampler(logits).astype(mx.uint32)
            st.advance(len(prompt), (token, 0))
            flight.add(token, [(s, st, st.position - 1, 0)])
            prompted.add(r)
            last["prompts"] += 1
            clock = self._lap(clock, "prefill", [s], token)
        # 3. one position for every stream whose input is ready
        ready = {}
        for r, s in enumerate(sessions):
            if r in prompted or s.done or not s.stream.prefilled:
                continue
            step = s.next_step()
            if step is not None:
                ready[r] = step
        if ready:
            r0, r1 = min(ready), max(ready) + 1
            rows = range(r0, r1)
            dim = next(iter(ready.values()))[0].shape[-1]
            zero_embed = self._zero((1, dim), next(iter(ready.values()))[0].dtype)
            embeds = mx.concatenate([ready[r][0] if r in ready else zero_embed for r in rows])[:, None]
            tokens = self._feed([ready[r][1] if r in ready else None for r in rows])[:, None]
            logits = model(embeds, tokens, self.cache, slice(r0, r1), [int(r in ready) for r in rows],
                           [sessions[r].stream.num_delay_tokens for r in rows])
            out = sample(logits, [sessions[r].sampler if r in ready else _GREEDY for r in rows]).astype(mx.uint32)
            for r in ready:
                st = sessions[r].stream
                st.advance(1, (out, r - r0))
            flight.add(out, [(sessions[r], sessions[r].stream, sessions[r].stream.position - 1, r - r0) for r in ready])
            last["decoded"] = len(ready)
            clock = self._lap(clock, "decode", [sessions[r] for r in ready], out)
        if not flight.records:
            return None
        last["build_s"] = time.perf_counter() - start
        flight.dispatch()
        self._lap(clock, "decode", flight.sessions())
        return flight

    @staticmethod
    def _share(follower: Session, leader: Session, embeds: mx.array) -> None:
        """The leader's new embeddings to an attached follower: the same audio positions
        (its mel frames, the same, are dropped); a faster delay ends a few positions sooner."""
        st = follower.stream
        if st.finished and st.pending_tokens() == 0:
            return  # all of its audio is embedded; the leader's right pad is longer
        if st.embedded != leader.stream.embedded - embeds.shape[0]:
            raise RuntimeError("a follower's audio embeddings are out of step with its leader's")
        n = min(embeds.shape[0], st.pending_tokens())
        if n:
            st.take_mel(n)
            st.add_audio_embeddings(embeds[:n])

    def _encode(self, encode: dict[int, int]) -> dict[int, mx.array]:
        """One encoder pass over rows min(encode)..max(encode) (``encode[r]`` tokens for row r;
        rows between sit it out); each encoded row's new embeddings."""
        sessions = self.sessions
        r0, r1 = min(encode), max(encode) + 1
        fpt = sessions[r0].stream.mel_frames_per_token
        n_mels = self.model.args.encoder.audio_encoding_args.num_mel_bins
        mel = np.zeros((r1 - r0, max(encode.values()) * fpt, n_mels), np.float32)
        lengths = [0] * (r1 - r0)
        for r, n in encode.items():
            frames = sessions[r].stream.take_mel(n)
            mel[r - r0, : frames.shape[0]] = frames
            lengths[r - r0] = frames.shape[0]
        embeds = self.model.encode(mx.array(mel), self.cache, slice(r0, r1), lengths)
        out = {}
        for r in encode:
            e = embeds[r - r0, : lengths[r - r0] // fpt]
            sessions[r].stream.add_audio_embeddings(e)
            out[r] = e
        return out

    def _feed(self, refs: list) -> mx.array:
        """The tokens to feed ``[n]``: row i's ``(array, index)`` reference, or 0 (sits out).
        When every row continues from the previous step's one array, that array is the input."""
        arrays = {id(ref[0]) for ref in refs if ref is not None}
        if len(arrays) == 1 and all(ref is not None for ref in refs):
            array = refs[0][0]
            indices = [ref[1] for ref in refs]
            if indices == list(range(array.shape[0])):
                return array
            return array[mx.array(indices)]
        zero = self._zero((1,), mx.uint32)
        return mx.concatenate([ref[0][ref[1] : ref[1] + 1] if ref is not None else zero for ref in refs])

    def _read(self) -> Optional[dict[Session, list]]:
        """The previous step's tokens, handed to their sessions (the step's one host read)."""
        flight = self._inflight
        if flight is None:
            return None
        start = time.perf_counter()
        values = flight.tokens.tolist()
        self.host_reads += 1
        self._lap(start, "decode", flight.sessions())
        events: dict[Session, list] = {}
        for session, stream, position, index in flight.records:
            if session.done or session.stream is not stream or session not in self.sessions:
                continue  # ended, restarted or dropped since: the token is stale
            new = session.on_token(values[index], position)
            if new:
                events.setdefault(session, []).extend(new)
        return events

    def drain(self) -> dict[Session, list]:
        """Step until no session can advance (all wait for audio, or are done)."""
        events: dict[Session, list] = {}
        while True:
            new, progressed = self.step()
            for s, evs in new.items():
                events.setdefault(s, []).extend(evs)
            if not progressed:
                return events


def _idle_events(session: Session) -> Optional[list]:
    """What a session with nothing in flight does: restart at the position limit, or end
    once all audio was decoded. None: nothing to do (more audio is needed)."""
    if session.done:
        return None
    if session.rollover_due:
        return session.rollover()
    if session.stream.audio_done:
        return session.end()
    return None


def result(session: Session) -> Transcription:
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
        timings=session.timings,
    )


def _session(model, delay_ms, temperature, seed, max_tokens, top_p=None, min_p=None, top_k=None) -> Session:
    session = Session(model, delay_ms, max_tokens=max_tokens,
                      sampler=Sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed))
    session.timings.load = getattr(model, "load_time", 0.0)
    return session


def transcribe(
    model,
    audio: AudioSource,
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k: Optional[int] = None,
    progress: Optional[Callable[[float, Optional[float]], None]] = None,
    profile: bool = False,
) -> Transcription:
    """Transcribe a whole recording.

    Args:
        model: a model returned by ``mlx_voxtral.load``.
        audio: a path (or ``file://`` URL), encoded bytes, a binary file object, or
            float32 16 kHz samples.
        delay_ms: transcription delay (multiple of 80 ms, 80 to 2400); default from
            ``tekken.json`` (480 ms).
        temperature: 0 for greedy decoding (recommended), otherwise sampling (with
            ``top_p``, ``min_p``, ``top_k`` as mlx-lm applies them).
        max_tokens: stop after this many text tokens (``finish_reason="length"``);
            ``None`` transcribes until the end of the audio (or EOS after it).
        seed: random seed for sampling (a 64-bit integer).
        progress: called as ``progress(seconds_done, seconds_total or None)``.
        profile: exact per-stage timings (a host sync after each stage; for benchmarks).

    The file is decoded, resampled and transcribed block by block, so memory does not
    grow with its length.

    Raises:
        AudioError, UnsupportedAudioFormatError: unreadable, empty or non-finite audio.
        InvalidRequestError: bad delay, temperature, sampling option, seed or max_tokens.
    """
    session = _session(model, delay_ms, temperature, seed, max_tokens, top_p, min_p, top_k)
    batch = Batch(model, profile=profile)
    batch.add(session)
    blocks = iter_audio(audio, block_seconds=BLOCK_SECONDS)
    with wired_limit():
        for block in blocks:
            session.push(block)
            batch.drain()
            if progress is not None:
                progress(session.duration, blocks.duration)
            if session.done:
                break
        if not session.done:
            session.finish()
            batch.drain()
            if progress is not None:
                progress(session.duration, blocks.duration)
    return result(session)


class Blocks:
    """Audio blocks for a decode loop that must not wait for them: ``poll()`` never blocks.

    An iterator is advanced on ``pool`` one block ahead; ``poll()`` returns the next block
    when it is ready, ``None`` while it is not (or at the end: then ``done`` is True), and
    raises what decoding raised. ``pending`` is the decoding under way (None when none), for
    a loop with nothing else to do to wait on. Without a pool, ``poll()`` decodes in place.
    """

    def __init__(self, blocks: Iterable[np.ndarray], pool: Optional[ThreadPoolExecutor] = None):
        self._blocks = iter(blocks)
        self._pool = pool
        self._future: Optional[concurrent.futures.Future] = None
        self.done = False

    def _next(self):
        return next(self._blocks, None)

    @property
    def pending(self) -> Optional[concurrent.futures.Future]:
        return self._future

    def poll(self) -> Optional[np.ndarray]:
        if self.done:
            return None
        if self._pool is None:
            block = self._next()
        else:
            if self._future is None:
                self._future = self._pool.submit(self._next)
            if not self._future.done():
                return None
            block, self._future = self._future.result(), None
        if block is None:
            self.done = True
        elif self._pool is not None:
            self._future = self._pool.submit(self._next)  # decode the next block meanwhile
        return block

    def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
        close = getattr(self._blocks, "close", None)
        if close is not None and (self._future is None or self._future.done()):
            close()


def _decoded(source: AudioSource) -> Iterator[np.ndarray]:
    """``source``'s 16 kHz blocks, the file opened on the first ``next`` (in a worker)."""
    yield from iter_audio(source, block_seconds=BLOCK_SECONDS)


class _File:
    def __init__(self, index: int, source: AudioSource):
        self.index, self.source = index, source
        self.attempts = 0
        self.start = time.perf_counter()
        self.session: Optional[Session] = None
        self.blocks: Optional[Blocks] = None
        self.joined = False  # in the batch (from its first block on, as ``transcribe`` starts)


def transcribe_many(
    model,
    sources: Iterable[AudioSource],
    *,
    batch_size: int = 4,
    workers: int = 2,
    retries: int = 1,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    progress: Optional[Callable[[float], None]] = None,
) -> Iterator[FileResult]:
    """Transcribe many recordings, ``batch_size`` of them decoded together in one ``Batch``,
    yielding a ``FileResult`` for each as it finishes (not in the order given).

    Audio is decoded in ``workers`` threads, one block ahead of the model, so reading and
    resampling overlap the model's work. A recording whose audio cannot be read (or whose
    session fails) is tried ``retries`` more times, then yielded with its ``error``; the
    others go on. Options as for ``transcribe``; they apply to every recording, and are
    checked before any work starts (``InvalidRequestError``). ``progress(seconds)`` is called
    with the seconds of audio each newly read block adds (negative when a retry starts over). Each result's tokens are those
    ``transcribe`` gives the same audio wherever README's guarantees table says a stream in
    a batch is identical to one alone.
    """
    if batch_size < 1 or workers < 1 or retries < 0:
        raise InvalidRequestError("batch_size and workers must be >= 1 and retries >= 0")
    _session(model, delay_ms, temperature, seed, max_tokens)  # bad options fail here, once
    queue = [_File(i, s) for i, s in enumerate(sources)]
    queue.reverse()
    batch = Batch(model)
    active: list[_File] = []

    def start(f: _File) -> None:
        f.attempts += 1
        f.session = _session(model, delay_ms, temperature, seed, max_tokens)
        f.blocks = Blocks(_decoded(f.source), pool)
        f.joined = False
        active.append(f)

    def stop(f: _File) -> None:
        active.remove(f)
        if f.joined:
            batch.remove(f.session)
        f.blocks.close()

    def finished(f: _File, error: Optional[BaseException]) -> Optional[FileResult]:
        stop(f)
        if error is not None and f.attempts <= retries:
            if progress is not None and f.session.samples:
                progress(-f.session.duration)  # read again from the start
            start(f)
            return None
        return FileResult(f.index, f.source, None if error else result(f.session), error, f.attempts,
                          time.perf_counter() - f.start)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-voxtral-audio") as pool, wired_limit():
        try:
            while queue or active:
                while queue and len(active) < batch_size:
                    start(queue.pop())
                done = []
                # feed each session its next block once it has encoded all it was given (as
                # ``transcribe`` does), so at most two blocks per audio are in memory
                for f in list(active):
                    s = f.session
                    if s.finished or s.done or (f.joined and s.stream.pending_tokens()):
                        continue
                    try:
                        block = f.blocks.poll()
                        if block is None:
                            if f.blocks.done:
                                s.finish()
                        else:
                            s.push(block)
                            if not f.joined:
                                batch.add(s)
                                f.joined = True
                            if progress is not None:
                                progress(block.shape[0] / model.tokenizer.sample_rate)
                    except Exception as e:  # unreadable audio: this file fails, the others go on
                        done.append(finished(f, e))
                _, progressed = batch.step()
                for f in list(active):
                    if f.session.done:
                        done.append(finished(f, None))
                for r in done:
                    if r is not None:
                        yield r
                if not progressed and not done:
                    waiting = [f.blocks.pending for f in active if f.blocks.pending is not None]
                    if waiting:
                        concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
        finally:
            for f in active:
                f.blocks.close()


def stream_transcribe(
    model,
    chunks: Iterable[np.ndarray],
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k: Optional[int] = None,
) -> Iterator[Event]:
    """Transcribe live audio: float32 16 kHz mono chunks of any size in, events out.

    Yields ``TextDelta`` (new text, as soon as decided), ``Word`` (a finished word with
    start/end seconds), ``StreamReset`` (the decoder restarted after EOS or at the
    position limit; the session goes on) and finally ``Done`` with the whole
    ``Transcription``. For the same audio the token ids equal offline ``transcribe``'s
    wherever README's table of guarantees says so.
    """
    session = _session(model, delay_ms, temperature, seed, max_tokens, top_p, min_p, top_k)
    batch = Batch(model)
    batch.add(session)
    with wired_limit():
        for chunk in chunks:
            session.push(check_samples(chunk))
            yield from batch.drain().get(session, [])
            if session.done:
                break
        if not session.done:
            if session.samples == 0:
                raise AudioError("the audio stream is empty (0 samples)")
            session.finish()
            yield from batch.drain().get(session, [])
    yield Done(result(session))


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
        def start():
            session = _session(model, delay_ms, temperature, seed, max_tokens)
            batch = Batch(model)
            batch.add(session)
            return session, batch

        session, batch = await loop.run_in_executor(worker, start)

        def work(chunk: Optional[np.ndarray]) -> list:
            if chunk is None:
                session.finish()
            else:
                session.push(chunk)
            return batch.drain().get(session, [])

        async for chunk in chunks:
            for event in await loop.run_in_executor(worker, work, check_samples(chunk)):
                yield event
            if session.done:
                break
        if not session.done:
            if session.samples == 0:
                raise AudioError("the audio stream is empty (0 samples)")
            for event in await loop.run_in_executor(worker, work, None):
                yield event
        yield Done(result(session))
