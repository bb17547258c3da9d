"""What transcription produces: results, the events of a live stream, and the engine's events.

Every type a caller receives lives here: ``Transcription`` (with its ``Timings``, ``Word``s and
``Segment``s), ``FileResult`` (one audio of ``transcribe_many``), the events of ``stream_transcribe`` (``TextDelta``, ``Word``, ``StreamReset``,
``Done``), those of a server engine job (``PartDone``, ``Finished``, ``Failed``,
``Provisional``), ``DeltaText``, the one adapter from text events to the deltas an API sends,
and ``ProvisionalText``, which makes dual delay's provisional text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Word:
    """A word with its start and end, in seconds of the recording."""

    text: str
    start: float
    end: float


@dataclass
class Segment:
    """A caption-sized run of words."""

    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)


@dataclass
class TextDelta:
    """New text, as soon as the decoder decided it. ``start``: seconds into the audio."""

    text: str
    start: float


@dataclass
class Provisional:
    """Dual delay: the faster delay's text beyond what the final text has decided so far.

    It replaces the previous ``Provisional`` (it is not a delta); "" once the final text has
    caught up. Appended to the final text so far as it is, it reads on: a leading space
    starts a new word.
    """

    text: str


@dataclass
class StreamReset:
    """The decoder restarted (``reason``: "eos" or "position_limit") at ``time`` seconds."""

    reason: str
    time: float


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
    def rtf(self) -> float:
        """Real-time factor: wall-clock seconds per second of audio (lower is faster)."""
        return self.timings.total / self.audio_duration if self.audio_duration else float("inf")

    @property
    def rtfx(self) -> float:
        """Seconds of audio transcribed per wall-clock second (higher is faster)."""
        return self.audio_duration / self.timings.total if self.timings.total else float("inf")

    @property
    def real_time_factor(self) -> float:
        """Deprecated: audio seconds per wall second, which is ``rtfx`` (the usual real-time
        factor is the inverse, ``rtf``)."""
        warnings.warn("Transcription.real_time_factor is deprecated: it is audio/wall, use .rtfx "
                      "(or .rtf for wall/audio)", DeprecationWarning, stacklevel=2)
        return self.rtfx

    @property
    def decode_tokens_per_sec(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.timings.decode if self.timings.decode else 0.0


@dataclass
class Done:
    """The last event of a stream: the whole transcription."""

    result: Transcription


Event = Union[TextDelta, Word, StreamReset, Done]


@dataclass
class FileResult:
    """One audio of ``transcribe_many``, finished: its ``Transcription``, or the error that
    stopped its last attempt (``result`` is then None)."""

    index: int  # position in the sources given
    source: object
    result: Optional[Transcription] = None
    error: Optional[BaseException] = None
    attempts: int = 1
    wall_seconds: float = 0.0  # from its first attempt's start to its end

    @property
    def ok(self) -> bool:
        return self.error is None


# engine jobs ----------------------------------------------------------------------------
@dataclass
class PartDone:
    """One audio of an offline job (or the live audio) is transcribed."""

    index: int
    result: Transcription


@dataclass
class Finished:
    """The job is complete: one ``Transcription`` per audio transcribed."""

    results: list[Transcription]


@dataclass
class Failed:
    """The job failed; ``error`` is the exception."""

    error: BaseException


class DeltaText:
    """Text events in, the deltas an API sends out: their concatenation is the (stripped)
    text of the transcription, and none is empty.

    Leading whitespace is dropped and trailing whitespace held back until more text comes.
    ``reset`` starts a new part (an audio of a multi-part request, a new live utterance).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started = False
        self.held = ""

    def add(self, event) -> Optional[str]:
        """The delta a ``TextDelta`` (or a plain string) adds, or None (nothing to send, or not
        a text event)."""
        piece = event.text if isinstance(event, TextDelta) else event if isinstance(event, str) else None
        if piece is None:
            return None
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return None
            self.started = True
        piece = self.held + piece
        body = piece.rstrip()
        self.held = piece[len(body):]
        return body or None


class ProvisionalText:
    """Dual delay: the text of a faster-delay stream that a slower one has not decided yet.

    ``add`` the fast stream's events (its ``TextDelta``s, with their times; a ``StreamReset``
    starts its text afresh); ``update(decided, started)`` with the slow stream's ``decided``
    seconds and whether its final text has started gives the new provisional text, or None
    if it did not change. The pieces kept are those timed after ``decided``.
    """

    def __init__(self):
        self.pieces: list[TextDelta] = []
        self.text = ""

    def add(self, events) -> None:
        for event in events:
            if isinstance(event, TextDelta):
                self.pieces.append(event)
            elif isinstance(event, StreamReset):
                self.pieces = []

    def update(self, decided: float, started: bool) -> Optional[str]:
        self.pieces = [p for p in self.pieces if p.start > decided]
        text = "".join(p.text for p in self.pieces).rstrip()
        if not started:
            text = text.lstrip()
        if text == self.text:
            return None
        self.text = text
        return text
