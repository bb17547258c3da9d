"""The transcription engine: one thread that decodes every request and live session together.

MLX arrays must be evaluated on the thread that built them, so all model work (creating
``Session``s, pushing audio, stepping the batch, results) happens on the engine's one worker
thread. Each loop iteration admits queued jobs up to ``max_concurrency``, feeds them
audio, and runs one step of a ``Batch`` (``mlx_voxtral.generate``) holding every active
job's session: one encoder pass, one decoder pass for every stream's next token, the next
step dispatched before the last one's tokens are read. Encoder work is at most
``encode_tokens`` tokens per stream and step, so a long upload is encoded a chunk at a time
while live streams keep their cadence. Events go back to each job's asyncio queue with
``loop.call_soon_threadsafe``.

Two kinds of job:

* **offline**: audio parts, transcribed one after another (a request with several parts)
  under one shared ``max_tokens`` budget. A part is an array or an iterator of blocks (an
  ``AudioBlocks`` decoding a file); iterators are advanced on the engine's decode pool, one
  block ahead, so the worker never waits for a decoder and a request holds only a block or
  two of decoded audio at a time.
* **live**: audio appended from a websocket as it arrives; ``finish()`` ends it. ``backlog``
  says how much of it waits for the decoder (the server stops reading the socket beyond a
  limit). With ``provisional_delay_ms`` (dual delay) a second session at that faster delay
  follows the job's own over the same encoder pass (``Batch.add(follows=...)``); its text
  beyond what the final text has decided comes as ``Provisional`` events.

Admission comes first: ``reserve`` takes a place (a ``Ticket``) before the caller reads or
decodes anything, and raises ``QueueFullError`` when ``max_concurrency + max_queue`` places
are taken, or ``LiveLimitError`` when ``max_live`` live sessions run, so a full server
refuses a request for the price of its headers.

A job gets ``TextDelta`` / ``Word`` / ``StreamReset`` events, a ``PartDone`` per finished
audio, and finally ``Finished`` (the ``Transcription`` of every part) or ``Failed``. A job
that fails, times out or is cancelled (client gone) is dropped at the next step; the
engine itself keeps running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from ..audio import SAMPLE_RATE
from ..exceptions import InvalidRequestError, VoxtralError
from ..generate import Batch, Blocks, result, wired_limit
from ..results import Failed, Finished, PartDone, Provisional, ProvisionalText
from ..sample import Sampler
from ..session import Session
from ..validate import check_samples

log = logging.getLogger(__name__)

# Offline audio is pushed into its session in blocks of this many seconds, whenever less
# than one block of it is waiting to be decoded.
FEED_SECONDS = 10.0
IDLE_WAIT = 0.05  # seconds the worker sleeps when no stream can advance
# Encoder work per stream and step, in 80 ms tokens: a long upload's 64 (5 s of audio) once
# every 64 steps costs the live streams beside it one slow step in 64.
ENCODE_TOKENS = 64


class QueueFullError(VoxtralError):
    """The engine has ``max_concurrency`` active and ``max_queue`` waiting jobs already."""


class LiveLimitError(QueueFullError):
    """``max_live`` live sessions run already."""


class RequestTimeoutError(VoxtralError):
    """A job ran past the engine's ``request_timeout``."""


class JobCancelledError(VoxtralError):
    """The job was cancelled (its client went away)."""


class EngineClosedError(VoxtralError):
    """The engine was shut down."""


def array_blocks(audio: np.ndarray, seconds: float = FEED_SECONDS) -> Iterator[np.ndarray]:
    """``audio`` in blocks of ``seconds``."""
    n = int(seconds * SAMPLE_RATE)
    return (audio[i : i + n] for i in range(0, audio.shape[0], n))


def waiting_samples(session: Session) -> int:
    """Audio pushed into ``session`` that waits for its encoder or decoder, in samples
    (padding included)."""
    stream = session.stream
    return (stream.pending_tokens() + stream.buffered) * stream.samples_per_token


def decoded_samples(session: Session) -> int:
    """Real samples of ``session``'s audio that its decoder has passed."""
    stream = session.stream
    position = max(0, stream.position - session.left_pad_tokens) * stream.samples_per_token
    return min(session.samples, session.origin + position)


def feed_offline(session: Session, blocks: Blocks, fed: int) -> int:
    """Give an offline session its next block of audio once less than ``FEED_SECONDS`` waits
    to be decoded (the end of the audio finishes it); returns the samples fed so far."""
    if session.finished or waiting_samples(session) >= FEED_SECONDS * SAMPLE_RATE:
        return fed
    block = blocks.poll()
    if block is not None:
        if block.shape[0]:
            session.push(check_samples(block))
        fed += block.shape[0]
    elif blocks.done:
        if fed == 0:
            raise VoxtralError("the audio is empty (0 samples)")
        session.finish()
    return fed


class Ticket:
    """A place in the engine, reserved before a request's body is read; give it to
    ``submit``/``start_live``, or ``release`` it."""

    def __init__(self, engine: "Engine", live: bool):
        self.engine, self.live, self.used = engine, live, False

    def release(self) -> None:
        if not self.used:
            self.used = True
            self.engine._release(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# jobs -----------------------------------------------------------------------------------
_FINISH = object()  # live inbox marker: no more audio


@dataclass(eq=False)
class Job:
    """One request or live session, as the engine and the asyncio side share it.

    The asyncio side reads ``events`` and calls ``append`` / ``finish`` / ``cancel``; the
    engine thread owns ``session`` and everything under it.
    """

    engine: "Engine"
    live: bool
    audios: list[Blocks]
    max_tokens: Optional[int]
    temperature: float
    seed: Optional[int]
    delay_ms: Optional[float]
    loop: asyncio.AbstractEventLoop
    deadline: Optional[float]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the asyncio side
    # engine-thread state
    closed: bool = False  # finished or failed: no more work
    session: Optional[Session] = None
    part: int = 0
    fed: int = 0  # samples of the current offline audio pushed so far
    results: list = field(default_factory=list)
    text_tokens: int = 0  # text tokens of the finished parts (max_tokens budget)
    inbox: collections.deque = field(default_factory=collections.deque)
    appended: int = 0  # live: samples appended (asyncio side)
    consumed: int = 0  # live: samples the encoder has consumed (engine side)
    provisional_delay_ms: Optional[float] = None  # live: dual delay's faster delay
    follower: Optional[Session] = None  # its session (engine side)
    provisional: Optional[ProvisionalText] = None

    def append(self, samples: np.ndarray) -> None:
        """Live jobs: more float32 16 kHz audio."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.appended += samples.shape[0]
        self.inbox.append(samples)
        self.engine._wake()

    @property
    def backlog(self) -> float:
        """Live jobs: seconds of appended audio the decoder has not consumed yet."""
        return (self.appended - self.consumed) / SAMPLE_RATE

    def finish(self) -> None:
        """Live jobs: the audio has ended."""
        self.inbox.append(_FINISH)
        self.engine._wake()

    def cancel(self) -> None:
        """Stop the job (the client went away); the engine drops it at its next step.

        Whoever still waits on ``events`` gets ``Failed(JobCancelledError)``. Call it from
        the job's event loop.
        """
        if not self.cancelled:
            self.cancelled = True
            self.events.put_nowait(Failed(JobCancelledError("the request was cancelled")))
            self.engine._wake()

    async def next_event(self):
        return await self.events.get()

    def _emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.cancelled = True


class Engine:
    """Schedules transcription jobs on one worker thread and batches their decoding.

    Args:
        model: a model from ``mlx_voxtral.load``.
        max_concurrency: streams decoded together (active jobs).
        max_queue: jobs that may wait for a slot; beyond, ``reserve`` raises ``QueueFullError``.
        max_live: live jobs at once (default: half of ``max_concurrency``, at least 1), so
            live sessions cannot take every slot from HTTP requests.
        request_timeout: seconds an offline job may take from submission (queue wait
            included) before it fails with ``RequestTimeoutError``; ``None``: no limit. Live
            jobs last as long as their connection.
        encode_tokens: most audio tokens (80 ms each) a stream encodes per step (default
            ``ENCODE_TOKENS``, at most the model's ``encode_tokens``).
    """

    def __init__(self, model, max_concurrency: int = 8, max_queue: int = 32,
                 request_timeout: Optional[float] = 600.0, encode_tokens: Optional[int] = None,
                 max_live: Optional[int] = None):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_live = max(1, max_concurrency // 2) if max_live is None else max_live
        if self.max_live < 0:
            raise ValueError("max_live must be >= 0")
        self._tickets = 0  # reserved, not yet submitted
        self._live_tickets = 0
        self.decode_pool = ThreadPoolExecutor(2, thread_name_prefix="mlx-voxtral-decode")
        self.request_timeout = request_timeout
        self.encode_tokens = encode_tokens or ENCODE_TOKENS
        self.batch: Optional[Batch] = None  # the worker thread's
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self.steps = 0  # batch steps run
        self.max_batch = 0  # most sessions decoded in one step
        self._thread = threading.Thread(target=self._run, name="mlx-voxtral-engine", daemon=True)
        self._thread.start()

    # asyncio side -------------------------------------------------------------------------
    def reserve(self, live: bool = False) -> Ticket:
        """A place for one job, taken before its input is read. Raises ``QueueFullError``
        (``LiveLimitError`` for a live job over ``max_live``) or ``EngineClosedError``."""
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            jobs = [j for j in [*self._active, *self._pending] if not self._finished(j)]
            if len(jobs) + self._tickets >= self.max_concurrency + self.max_queue:
                raise QueueFullError(
                    f"the server is busy ({self.max_concurrency} requests running, "
                    f"{self.max_queue} waiting); retry later"
                )
            if live and sum(j.live for j in jobs) + self._live_tickets >= self.max_live:
                raise LiveLimitError(f"the server runs its limit of {self.max_live} live sessions; retry later")
            self._tickets += 1
            self._live_tickets += live
        return Ticket(self, live)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets -= 1
            self._live_tickets -= ticket.live

    def submit(self, audios: list[Union[np.ndarray, Iterable[np.ndarray]]], *, max_tokens: Optional[int] = None,
               temperature: float = 0.0, seed: Optional[int] = None,
               delay_ms: Optional[float] = None, ticket: Optional[Ticket] = None) -> Job:
        """Queue an offline job over ``audios`` (float32 16 kHz arrays, or iterators of such
        blocks, decoded on the engine's pool as the job needs them). Call from the loop."""
        if not audios:
            raise ValueError("an offline job needs at least one audio")
        parts = [Blocks(array_blocks(a)) if isinstance(a, np.ndarray) else Blocks(a, self.decode_pool)
                 for a in audios]
        return self._add(False, parts, max_tokens, temperature, seed, delay_ms, ticket)

    def start_live(self, *, temperature: float = 0.0, delay_ms: Optional[float] = None,
                   max_tokens: Optional[int] = None, ticket: Optional[Ticket] = None,
                   provisional_delay_ms: Optional[float] = None) -> Job:
        """Queue a live job; feed it with ``job.append`` and end it with ``job.finish``.

        ``provisional_delay_ms``: dual delay (a delay shorter than ``delay_ms``): the job
        also gets ``Provisional`` events, that faster delay's text ahead of the final one.
        """
        self.check_provisional(delay_ms, provisional_delay_ms)
        job = self._add(True, [], max_tokens, temperature, None, delay_ms, ticket)
        job.provisional_delay_ms = provisional_delay_ms
        return job

    def check_provisional(self, delay_ms: Optional[float], provisional_delay_ms: Optional[float],
                          param: str = "provisional_delay_ms") -> None:
        """``InvalidRequestError`` unless ``provisional_delay_ms`` is None or a valid delay
        shorter than ``delay_ms``."""
        if provisional_delay_ms is None:
            return
        tok = self.model.tokenizer
        fast, slow = tok.check_delay(provisional_delay_ms), tok.check_delay(delay_ms)
        if fast >= slow:
            raise InvalidRequestError(f"{param} ({fast} ms) must be shorter than the delay ({slow} ms)", param)

    def _add(self, live, audios, max_tokens, temperature, seed, delay_ms, ticket) -> Job:
        ticket = ticket or self.reserve(live)
        if ticket.used or ticket.live != live:
            raise ValueError("a ticket is used once, for the kind of job it was reserved for")
        loop = asyncio.get_running_loop()
        deadline = None if (live or self.request_timeout is None) else time.monotonic() + self.request_timeout
        job = Job(self, live, audios, max_tokens, temperature, seed, delay_ms, loop, deadline)
        with self._lock:
            ticket.used = True
            self._tickets -= 1
            self._live_tickets -= live
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            self._pending.append(job)
        self._wake()
        return job

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) jobs. A job that has answered counts no more, even before the
        worker thread drops it at the end of its step; a reserved place counts as waiting."""
        with self._lock:
            return (sum(not self._finished(j) for j in self._active),
                    sum(not self._finished(j) for j in self._pending) + self._tickets)

    def close(self) -> None:
        """Stop the worker; jobs still running fail with ``EngineClosedError``."""
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=30)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        self._wakeup.set()

    # worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        with wired_limit():
            self.batch = Batch(self.model, self.encode_tokens)
            while True:
                self._wakeup.clear()
                with self._lock:
                    closed = self._closed
                    while not closed and self._pending and len(self._active) < self.max_concurrency:
                        self._active.append(self._pending.popleft())
                    jobs = list(self._active)
                if closed:
                    for job in jobs + list(self._pending):
                        job._emit(Failed(EngineClosedError("the server is shutting down")))
                    return
                jobs = [job for job in jobs if self._prepare(job)]
                try:
                    progressed = self._step(jobs) if jobs else False
                except Exception as e:  # a bug: fail this step's jobs, keep serving the others
                    log.exception("engine step failed")
                    for job in jobs:
                        self._fail(job, e)
                    self.batch = Batch(self.model, self.encode_tokens)
                    progressed = True
                with self._lock:
                    self._active = [j for j in self._active if j in jobs and not self._finished(j)]
                if not progressed:
                    self._wakeup.wait(IDLE_WAIT)

    @staticmethod
    def _finished(job: Job) -> bool:
        return job.cancelled or job.closed

    def _drop(self, job: Job) -> None:
        """Take the job's sessions out of the batch; stop decoding its audio."""
        if job.session is not None and job.session in self.batch.sessions:
            self.batch.remove(job.session)  # and its follower
        job.session = job.follower = None
        if job.closed or job.cancelled:
            for part in job.audios:
                part.close()

    def _fail(self, job: Job, error: BaseException) -> None:
        job.closed = True
        self._drop(job)
        job._emit(Failed(error))

    def _prepare(self, job: Job) -> bool:
        """Drop a cancelled or late job; start its session; give it audio. False: drop it."""
        if job.cancelled or job.closed:
            self._drop(job)
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._fail(job, RequestTimeoutError(f"the request took more than {self.request_timeout:g} s"))
            return False
        try:
            if job.session is None:
                job.session = Session(self.model, job.delay_ms, max_tokens=self._budget(job),
                                      sampler=Sampler(job.temperature, seed=job.seed))
                self.batch.add(job.session)
                if job.provisional_delay_ms is not None:
                    job.follower = Session(self.model, job.provisional_delay_ms,
                                           sampler=Sampler(job.temperature, seed=job.seed))
                    self.batch.add(job.follower, follows=job.session)
                    job.provisional = ProvisionalText()
            if job.live:
                self._feed_live(job)
            else:
                self._feed_offline(job)
        except Exception as e:  # bad parameters or audio: this job only
            self._fail(job, e)
            return False
        return True

    def _budget(self, job: Job) -> Optional[int]:
        """The text tokens the job's next session may still produce."""
        if job.max_tokens is None:
            return None
        return job.max_tokens - job.text_tokens

    def _feed_offline(self, job: Job) -> None:
        job.fed = feed_offline(job.session, job.audios[job.part], job.fed)

    def _feed_live(self, job: Job) -> None:
        session = job.session
        sessions = [session] if job.follower is None else [session, job.follower]
        job.consumed = decoded_samples(session)
        while job.inbox:
            item = job.inbox.popleft()
            if session.finished:
                continue
            if item is _FINISH:
                if session.samples == 0:
                    raise VoxtralError("no audio was appended before the end of the session")
                for s in sessions:
                    s.finish()
            elif item.shape[0]:
                item = check_samples(item)
                for s in sessions:
                    s.push(item)

    def _step(self, jobs: list[Job]) -> bool:
        """One step of the batch; True if any stream advanced."""
        self.steps += 1
        self.max_batch = max(self.max_batch, len(self.batch))
        try:
            events, progressed = self.batch.step()
        except Exception as e:  # cannot tell whose stream broke it: fail every job in the step
            log.exception("the batch step failed")
            for job in jobs:
                self._fail(job, e)
            self.batch = Batch(self.model, self.encode_tokens)
            return True
        for job in jobs:
            session = job.session
            for event in events.get(session, ()):
                job._emit(event)
            if job.follower is not None and not session.done:
                job.provisional.add(events.get(job.follower, ()))
                text = job.provisional.update(session.decided, session.n_text > 0)
                if text is not None:
                    job._emit(Provisional(text))
            if session is not None and session.done:
                try:
                    self._end_part(job)
                except Exception as e:
                    log.exception("finishing a job failed")
                    self._fail(job, e)
        return progressed

    def _end_part(self, job: Job) -> None:
        session = job.session
        part = result(session)
        self._drop(job)
        job.text_tokens += session.n_text
        job.results.append(part)
        job._emit(PartDone(job.part, part))
        job.part += 1
        job.fed = 0
        if job.live or part.finish_reason == "length" or job.part >= len(job.audios):
            job.closed = True  # leaves the active set (before the client can see its answer)
            job._emit(Finished(job.results))
        # else the next audio of the request gets its session at the next step
