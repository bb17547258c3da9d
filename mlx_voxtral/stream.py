"""What one transcription stream carries between steps: its audio front end and its queues.

A ``StreamState`` turns 16 kHz samples into the decoder's inputs incrementally and exactly as
the offline computation would: mel frames on the global grid (on the host), whole 80 ms tokens
handed to the encoder, audio embeddings queued for the decoder, and the decoder's position and
last token. Its encoder and decoder caches are one row of a batch's ``Cache``; the driver in
``generate.py`` owns both and runs the passes.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .audio import LogMelStream

# A token to feed: the prompt's ids, or (array, index) of a sampled token not read back yet.
TokenRef = tuple[mx.array, int]


class StreamState:
    """One stream's transcription state.

    Lifecycle: ``push(samples)`` any number of times, ``finish()`` once; meanwhile the driver
    alternates ``take_mel``/``add_audio_embeddings`` (encoder work) and
    ``decoder_input``/``advance`` (decoder work).
    """

    def __init__(self, model, delay_ms: Optional[float] = None):
        tok = model.tokenizer
        enc = model.args.encoder.audio_encoding_args
        self.delay_ms = tok.check_delay(delay_ms)
        self.num_delay_tokens = tok.num_delay_tokens(self.delay_ms)
        self.prompt = tok.prompt(self.delay_ms)
        self.samples_per_token = tok.samples_per_token
        self.mel_frames_per_token = tok.mel_frames_per_token
        self.left_pad, self.right_pad = tok.padding(self.delay_ms)
        self.mel = LogMelStream(enc.num_mel_bins, enc.window_size, enc.hop_length, enc.global_log_mel_max)
        self.samples = 0  # real audio samples pushed
        self.finished = False
        self.total_positions: Optional[int] = None  # known once finished
        self._mel_blocks: list[np.ndarray] = []
        self._mel_frames = 0  # mel frames pending in _mel_blocks
        self._mel_frames_taken = 0
        self._embeds: list[mx.array] = []  # audio embeddings not yet fed to the decoder
        self.embedded = 0  # audio positions embedded so far
        self.position = 0  # decoder positions dispatched so far
        self.last_token: Optional[TokenRef] = None  # the token to feed at `position`
        self._add_samples(np.zeros(self.left_pad, np.float32))

    # audio side -------------------------------------------------------------------------
    def _add_samples(self, samples: np.ndarray) -> None:
        frames = self.mel(samples)
        if frames.shape[0]:
            self._mel_blocks.append(frames)
            self._mel_frames += frames.shape[0]

    def push(self, samples: np.ndarray) -> None:
        """Append real audio (float32 mono 16 kHz)."""
        if self.finished:
            raise RuntimeError("cannot push audio into a finished stream")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples += samples.shape[0]
        self._add_samples(samples)

    def finish(self) -> None:
        """End of audio: add the token alignment, the right pad and the STFT look-ahead."""
        if self.finished:
            return
        spt = self.samples_per_token
        align = (spt - self.samples % spt) % spt
        self.total_positions = (self.left_pad + self.samples + align + self.right_pad) // spt
        self._add_samples(np.zeros(align + self.right_pad + self.mel.n_fft // 2, np.float32))
        self.finished = True

    def pending_tokens(self) -> int:
        """Whole audio tokens whose mel frames are ready but not yet encoded."""
        n = self._mel_frames // self.mel_frames_per_token
        if self.total_positions is not None:
            n = min(n, self.total_positions - self._mel_frames_taken // self.mel_frames_per_token)
        return max(n, 0)

    def take_mel(self, max_tokens: int) -> Optional[np.ndarray]:
        """Pop the mel frames of up to ``max_tokens`` whole tokens (``[8 n, n_mels]``)."""
        n = min(self.pending_tokens(), max_tokens)
        if n == 0:
            return None
        mel = self._mel_blocks[0] if len(self._mel_blocks) == 1 else np.concatenate(self._mel_blocks)
        frames = n * self.mel_frames_per_token
        rest = mel[frames:]
        self._mel_blocks = [rest] if rest.shape[0] else []
        self._mel_frames -= frames
        self._mel_frames_taken += frames
        if self.total_positions is not None and self.pending_tokens() == 0:
            self._mel_blocks, self._mel_frames = [], 0  # look-ahead frames past the end
        return mel[:frames]

    def add_audio_embeddings(self, embeds: mx.array) -> None:
        self._embeds.append(embeds)
        self.embedded += embeds.shape[0]

    @property
    def buffered(self) -> int:
        """Audio embeddings waiting for the decoder."""
        return self.embedded - self.position

    # decoder side -----------------------------------------------------------------------
    @property
    def prefilled(self) -> bool:
        return self.position > 0

    @property
    def audio_done(self) -> bool:
        """True once every audio position has been fed to the decoder."""
        return self.finished and self.position >= self.total_positions

    def next_length(self) -> int:
        """Positions the next decoder pass feeds: the prompt first, then one at a time."""
        return 1 if self.prefilled else len(self.prompt)

    def decoder_input(self) -> Optional[tuple[mx.array, Union[list[int], TokenRef]]]:
        """The next pass's ``(audio embeddings [n, dim], tokens)``, or None if not ready: the
        prompt's ids first, then the token produced at the previous position."""
        n = self.next_length()
        if self.buffered < n:
            return None
        embeds = self._embeds[0] if len(self._embeds) == 1 else mx.concatenate(self._embeds)
        self._embeds = [embeds[n:]] if embeds.shape[0] > n else []
        return embeds[:n], (self.prompt if not self.prefilled else self.last_token)

    def advance(self, n: int, token: TokenRef) -> None:
        """Record that ``n`` positions were dispatched and ``token`` will come out."""
        self.position += n
        self.last_token = token
