"""Word and segment timing from token positions.

Voxtral Realtime is a delayed-streams model: the text stream runs ``d`` tokens (the delay,
80 ms each) behind the audio. The token the decoder produces at position ``p`` is the text
slot ``p + 1``, which is aligned with audio position ``a = p + 1 - d``. Audio position ``a``
covers padded samples ``[1280 a, 1280 (a + 1))``; the first ``L = 32`` positions are left
padding, so in seconds of real audio::

    start(p) = (p + 1 - d - L) * 0.08        end(p) = start(p) + 0.08

A word starts at a text token whose piece begins with whitespace, or right after a
``[STREAMING_WORD]`` mark (whose slot then gives the start time); it ends with the end
of its last token. Times have a resolution of one token (80 ms); the model can place a
word a few tokens late when it needs more context, so expect errors of about +-0.1 s to
+-0.3 s on real speech.
"""

from __future__ import annotations

from typing import Optional

from .results import Segment, Word

# A pause longer than this, or sentence-ending punctuation, starts a new segment; so does
# a segment reaching the length limits.
SEGMENT_PAUSE = 1.0
SEGMENT_MAX_SECONDS = 12.0
SEGMENT_MAX_WORDS = 40


def token_start(position: int, num_delay_tokens: int, left_pad_tokens: int = 32, token_seconds: float = 0.08) -> float:
    """Start (seconds of real audio) of the audio aligned with the token made at ``position``."""
    return (position + 1 - num_delay_tokens - left_pad_tokens) * token_seconds


class WordTracker:
    """Groups decoded text pieces into timed words as tokens arrive."""

    def __init__(self, token_seconds: float = 0.08):
        self.token_seconds = token_seconds
        self._text = ""
        self._start: Optional[float] = None  # None: no word in progress
        self._end = 0.0
        self._mark: Optional[float] = None  # start time of a pending [STREAMING_WORD]

    def mark_word(self, time: float) -> Optional[Word]:
        """A ``[STREAMING_WORD]`` at ``time``: the next text starts a word. Returns the
        word it closes, if any."""
        closed = self.flush()
        self._mark = time
        return closed

    def add(self, piece: str, time: float) -> Optional[Word]:
        """Add a text piece produced at ``time``; return the word it completes, if any."""
        if not piece:  # a token holding part of a multi-byte character
            if self._start is not None:
                self._end = time + self.token_seconds
            return None
        closed = None
        if self._start is not None and (piece[0].isspace() or self._mark is not None):
            closed = self.flush()
        text = piece if self._start is not None else piece.lstrip()
        if text:
            if self._start is None:
                self._start = self._mark if self._mark is not None else time
                self._mark = None
            self._text += text
            self._end = time + self.token_seconds
        return closed

    def flush(self) -> Optional[Word]:
        """Close the word in progress (end of stream, reset, or a new word)."""
        if self._start is None:
            return None
        word = Word(self._text.strip(), round(max(self._start, 0.0), 3), round(max(self._end, 0.0), 3))
        self._text, self._start = "", None
        return word


def segments_from_words(words: list[Word]) -> list[Segment]:
    """Group words into caption-sized segments at pauses and sentence ends."""
    segments: list[Segment] = []
    current: list[Word] = []
    for word in words:
        if current:
            prev = current[-1]
            if (
                word.start - prev.end > SEGMENT_PAUSE
                or prev.text[-1:] in ".?!"
                or word.end - current[0].start > SEGMENT_MAX_SECONDS
                or len(current) >= SEGMENT_MAX_WORDS
            ):
                segments.append(_segment(current))
                current = []
        current.append(word)
    if current:
        segments.append(_segment(current))
    return segments


def _segment(words: list[Word]) -> Segment:
    return Segment(" ".join(w.text for w in words), words[0].start, words[-1].end, list(words))
