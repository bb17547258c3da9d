"""The state one transcription stream carries: audio front end, caches, pending embeddings.

A ``Stream`` turns 16 kHz samples into decoder inputs incrementally and exactly as the
offline computation would: mel frames on the global grid, conv tails, encoder and decoder
KV caches with their sliding windows, and whole 80 ms tokens at every stage. It holds no
loop; ``generate.py`` (one stream) and the server engine (many streams, batched) drive it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .audio import LogMelStream

# Encoder work is done in blocks of at most this many tokens (80 ms each): 30 s of audio.
MAX_ENCODE_TOKENS = 375


class Stream:
    """One stream's transcription state.

    Lifecycle: ``push(samples)`` any number of times, ``finish()`` once; meanwhile the
    driver alternates ``take_mel``/``add_audio_embeddings`` (encoder work) and
    ``decoder_input``/``advance`` (decoder work).
    """

    def __init__(self, model, delay_ms: Optional[float] = None):
        tok = model.tokenizer
        enc = model.args.encoder.audio_encoding_args
        self.model = model
        self.delay_ms = tok.check_delay(delay_ms)
        self.num_delay_tokens = tok.num_delay_tokens(self.delay_ms)
        self.prompt = tok.prompt(self.delay_ms)
        self.samples_per_token = tok.samples_per_token
        self.mel_frames_per_token = tok.mel_frames_per_token
        self.left_pad, self.right_pad = tok.padding(self.delay_ms)
        self.mel = LogMelStream(enc.num_mel_bins, enc.window_size, enc.hop_length, enc.global_log_mel_max)
        self.conv_caches, self.encoder_caches = model.encoder.make_cache()
        self.decoder_caches = model.decoder.make_cache()
        self.samples = 0  # real audio samples pushed
        self.finished = False
        self.total_positions: Optional[int] = None  # known once finished
        self._mel_blocks: list[mx.array] = []
        self._mel_frames = 0  # mel frames pending in _mel_blocks
        self._mel_frames_taken = 0
        self._embeds: list[mx.array] = []  # audio embeddings not yet fed to the decoder
        self.embedded = 0  # audio positions embedded so far
        self.position = 0  # decoder positions consumed so far
        self.last_token: Optional[mx.array] = None  # the token to feed at `position`
        self._add_samples(np.zeros(self.left_pad, np.float32))

    # audio side -------------------------------------------------------------------------
    def _add_samples(self, samples: np.ndarray) -> None:
        frames = self.mel(samples)
        mx.eval(frames)  # nothing lazy is left behind: another thread may continue the stream
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

    def take_mel(self, max_tokens: int = MAX_ENCODE_TOKENS) -> Optional[mx.array]:
        """Pop the mel frames of up to ``max_tokens`` whole tokens (``[8 n, n_mels]``)."""
        n = min(self.pending_tokens(), max_tokens)
        if n == 0:
            return None
        mel = self._mel_blocks[0] if len(self._mel_blocks) == 1 else mx.concatenate(self._mel_blocks)
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

    # decoder side -----------------------------------------------------------------------
    @property
    def prefilled(self) -> bool:
        return self.position > 0

    @property
    def audio_done(self) -> bool:
        """True once every audio position has been fed to the decoder."""
        return self.finished and self.position >= self.total_positions

    def decoder_input(self) -> Optional[tuple[mx.array, mx.array]]:
        """The next decoder step's ``(audio embeddings, token ids)``, or None if not ready.

        The first step is the prompt (``len(prompt)`` positions); every later step is one
        position fed with the previously produced token.
        """
        n = len(self.prompt) if not self.prefilled else 1
        if self.embedded - self.position < n:
            return None
        embeds = self._embeds[0] if len(self._embeds) == 1 else mx.concatenate(self._embeds)
        self._embeds = [embeds[n:]] if embeds.shape[0] > n else []
        tokens = mx.array(self.prompt) if not self.prefilled else self.last_token
        return embeds[:n], tokens

    def advance(self, n: int, token: mx.array) -> None:
        """Record that ``n`` positions were fed and ``token`` (lazy, shape [1]) came out."""
        self.position += n
        self.last_token = token
