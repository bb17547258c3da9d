"""A transcription session: one stream of audio in, text, words and events out.

A ``Session`` wraps a ``StreamState`` with everything that spans the whole
recording: token history, incremental detokenisation, word timing, ``max_tokens``, and
the two restart rules that let a session run for hours:

* **EOS**: if the model emits EOS once the audio has ended and the decoder has been fed
  its last real audio position, the transcription is complete. Otherwise (a live session,
  or EOS in the middle of a long file) the decoder restarts: a fresh stream (left pad and
  prompt, positions from 0) is fed the audio from the first sample the text stream had not
  covered yet (the EOS position minus the delay), so nothing is lost.
* **Position limit**: a stream may not pass the model's ``model_max_length`` positions
  (131072, about 2.9 h). Past 90 % of it the session restarts at the next pause (a run of
  ``[STREAMING_PAD]`` longer than the delay), and at the limit it restarts regardless.

Restarts replay at most the uncovered tail of the audio, so memory stays bounded. The
session holds no loop; ``generate.py`` drives one session, the server's engine many.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .exceptions import InvalidRequestError
from .results import StreamReset, TextDelta, Timings, Word
from .sample import Sampler
from .stream import StreamState
from .timestamps import WordTracker, segments_from_words, token_start
from .tokenizer import StreamingDetokenizer
from .validate import check_max_tokens, check_samples


class Session:
    """State of one transcription across decoder restarts."""

    def __init__(
        self,
        model,
        delay_ms: Optional[float] = None,
        temperature: float = 0.0,
        seed: Optional[int] = None,
        max_tokens: Optional[int] = None,
        max_positions: Optional[int] = None,
        sampler: Optional[Sampler] = None,
    ):
        self.model = model
        self.tokenizer = tok = model.tokenizer
        self.sampler = sampler if sampler is not None else Sampler(temperature, seed=seed)
        self.temperature = self.sampler.temperature
        self.max_tokens = check_max_tokens(max_tokens)
        self.stream = StreamState(model, delay_ms)
        self.delay_ms = self.stream.delay_ms
        self.max_positions = max_positions or model.args.model_max_length
        if self.max_positions <= len(self.stream.prompt) + 1:
            raise InvalidRequestError(f"max_positions must exceed the prompt length, got {self.max_positions}")
        self.left_pad_tokens = self.stream.left_pad // tok.samples_per_token
        self.token_seconds = tok.samples_per_token / tok.sample_rate
        self.samples = 0  # real samples pushed, over all streams
        self.origin = 0  # real samples before the current stream's first sample
        self._history = np.zeros(0, np.float32)  # the current stream's not-yet-covered samples
        self._history_start = 0  # index (in the current stream) of _history[0]
        self.finished = False
        self.token_ids: list[int] = []
        self.words: list[Word] = []
        self.n_text = 0
        self.resets = 0
        self.finish_reason: Optional[str] = None
        self._text: list[str] = []
        self._detok = StreamingDetokenizer(tok)
        self._tracker = WordTracker(self.token_seconds)
        self._pad_run = 0
        self._rollover_due = False
        self._decided = 0  # real samples (of the whole recording) the text has passed
        self.timings = Timings()  # wall-clock seconds of the steps this session took part in

    # audio in ---------------------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        """Append audio (float32 mono 16 kHz); NaN or infinite samples are an ``AudioError``."""
        samples = check_samples(samples)
        self.samples += samples.shape[0]
        self.stream.push(samples)
        self._history = np.concatenate([self._history, samples])

    def finish(self) -> None:
        self.finished = True
        self.stream.finish()

    @property
    def duration(self) -> float:
        return self.samples / self.tokenizer.sample_rate

    # decoder driving --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_step(self):
        """The next decoder input ``(embeds, tokens)`` of the current stream, or None.

        None when audio is missing, or when the stream reached its position limit (then
        ``rollover_due`` is set; call ``rollover`` once every queued token is handled).
        """
        if self._rollover_due:
            return None
        if self.stream.position + self.stream.next_length() > self.max_positions:
            self._rollover_due = not self.stream.audio_done
            return None
        return self.stream.decoder_input()

    @property
    def rollover_due(self) -> bool:
        return self._rollover_due

    def end(self) -> list:
        """Every audio position was decoded: finish, returning the closing events."""
        self.finish_reason = "end_of_audio"
        return self._close_text()

    def _last_audio_position(self) -> int:
        """Decoder position of the current stream's last real audio (once finished)."""
        spt = self.tokenizer.samples_per_token
        return self.left_pad_tokens + -(-self.stream.samples // spt) - 1

    def _covered(self, position: int) -> int:
        """Samples of the current stream's real audio that the text up to ``position`` covers."""
        aligned = position + 1 - self.stream.num_delay_tokens - self.left_pad_tokens
        return min(max(aligned, 0) * self.tokenizer.samples_per_token, self.stream.samples)

    def _add_word(self, word: Optional[Word], events: list) -> None:
        """Record a finished word, its times clamped to the audio received."""
        if word is None:
            return
        duration = round(self.duration, 3)
        word.start, word.end = min(word.start, duration), min(word.end, duration)
        self.words.append(word)
        events.append(word)

    def _close_text(self) -> list:
        events: list = []
        tail = self._detok.flush()
        if tail:
            self._text.append(tail)
            events.append(TextDelta(tail, self.words[-1].end if self.words else 0.0))
        self._add_word(self._tracker.flush(), events)
        return events

    def _restart(self, reason: str, covered: int) -> list:
        """New stream from the first sample the text has not covered yet."""
        return self._new_stream(reason, self.origin + covered,
                                self._history[covered - self._history_start :])

    def _new_stream(self, reason: str, origin: int, replay: np.ndarray) -> list:
        """Close the text; a fresh stream whose audio starts at sample ``origin`` of the
        recording, ``replay`` (every sample from there on) pushed into it."""
        events = self._close_text()
        self.origin = self._decided = origin
        self.stream = StreamState(self.model, self.delay_ms)
        self._history = np.zeros(0, np.float32)
        self._history_start = 0
        self.samples = origin
        self.push(replay)
        if self.finished:
            self.stream.finish()
        self.resets += 1
        self._pad_run = 0
        self._rollover_due = False
        self._detok = StreamingDetokenizer(self.tokenizer)
        events.append(StreamReset(reason, round(self.origin / self.tokenizer.sample_rate, 3)))
        return events

    # dual delay -------------------------------------------------------------------------
    @property
    def decided(self) -> float:
        """Seconds of the recording the text has passed: the decoder's last position, less
        its delay. Text about audio after this is still to come."""
        return self._decided / self.tokenizer.sample_rate

    @property
    def followable(self) -> bool:
        """The current stream has made no token and holds every sample since its origin, so
        a ``follow`` of it sees exactly its audio."""
        return (self.stream.position == 0 and self._history_start == 0
                and self._history.shape[0] == self.stream.samples)

    def follow(self, leader: "Session") -> list:
        """Restart on ``leader``'s fresh stream (``leader.followable``): from the same sample,
        with the same audio, so that one encoder pass serves both (dual delay: the leader,
        the slower delay, has just restarted). This session must have been pushed the same
        samples as ``leader``. Returns the closing events of a restart (reason "leader")."""
        if not leader.followable or leader.samples != self.samples:
            raise RuntimeError("the leader's stream cannot be followed")
        return self._new_stream("leader", leader.origin, leader._history)

    def rollover(self) -> list:
        """Restart at the position limit (see the module docstring)."""
        return self._restart("position_limit", self._covered(self.stream.position - 1))

    def on_token(self, token_id: int, position: int) -> list:
        """Account for the token the decoder made at ``position``; return its events."""
        tok = self.tokenizer
        self.token_ids.append(token_id)
        t = round(self.origin / tok.sample_rate + token_start(
            position, self.stream.num_delay_tokens, self.left_pad_tokens, self.token_seconds
        ), 3)
        t = min(t, round(self.duration, 3))  # text made in the right padding
        covered = self._covered(position)
        self._decided = max(self._decided, self.origin + covered)
        if token_id == tok.eos_id:
            if self.stream.finished and position >= self._last_audio_position():
                self.finish_reason = "stop"
                return self._close_text()
            return self._restart("eos", covered)
        events: list = []
        if tok.streaming_word_id is not None and token_id == tok.streaming_word_id:
            self._add_word(self._tracker.mark_word(t), events)
        elif tok.is_text(token_id):
            piece = self._detok.add(token_id)
            self._add_word(self._tracker.add(piece, t), events)
            if piece:
                self._text.append(piece)
                events.append(TextDelta(piece, t))
            self.n_text += 1
            if self.max_tokens is not None and self.n_text >= self.max_tokens:
                self.finish_reason = "length"
                events += self._close_text()
                return events
        self._pad_run = self._pad_run + 1 if token_id == tok.streaming_pad_id else 0
        # forget audio the text has covered (keep it bounded)
        drop = covered - self._history_start
        if drop > 0:
            self._history = self._history[drop:]
            self._history_start = covered
        if (
            self.stream.position > 0.9 * self.max_positions
            and self._pad_run > self.stream.num_delay_tokens
            and not self.stream.audio_done
        ):
            self._rollover_due = True
        return events

    @property
    def text(self) -> str:
        return "".join(self._text).strip()

    @property
    def segments(self):
        return segments_from_words(self.words)
