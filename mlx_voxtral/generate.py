"""Decoding loops: offline transcription of a whole file, token by token with timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .audio import AudioSource, SAMPLE_RATE, iter_audio
from .exceptions import InvalidRequestError
from .stream import Stream

# Audio is fed to the stream in blocks of this many seconds (bounds memory for long files).
BLOCK_SECONDS = 30.0


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
    """Result of ``transcribe``.

    ``token_ids`` are the raw generated ids, special tokens included (``[STREAMING_PAD]``,
    ``[STREAMING_WORD]``, a final EOS); ``text`` keeps only text tokens.
    """

    text: str
    token_ids: list[int]
    audio_duration: float
    delay_ms: int
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS), "end_of_audio" or "length" (max_tokens reached)
    timings: Timings = field(default_factory=Timings)

    @property
    def real_time_factor(self) -> float:
        """Audio seconds transcribed per wall-clock second."""
        return self.audio_duration / self.timings.total if self.timings.total else float("inf")

    @property
    def decode_tokens_per_sec(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.timings.decode if self.timings.decode else 0.0


def check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not np.isfinite(temperature)
        or temperature < 0
    ):
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return float(temperature)


def sample(logits: mx.array, temperature: float, key: Optional[mx.array] = None) -> mx.array:
    """Greedy argmax at temperature 0, otherwise a draw from ``softmax(logits / T)``."""
    logits = logits.astype(mx.float32)
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits * (1.0 / temperature), key=key)


class _Clock:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def generate_tokens(
    model,
    stream: Stream,
    temperature: float = 0.0,
    key: Optional[mx.array] = None,
    timings: Optional[Timings] = None,
) -> Iterator[int]:
    """Yield the tokens the stream's available audio lets the decoder produce.

    Encodes pending audio, then runs the decoder while audio embeddings are ready. The next
    step is queued before the previous token is read back, so the host never idles.
    """
    timings = timings if timings is not None else Timings()
    clock = _Clock()
    while (mel := stream.take_mel()) is not None:
        (embeds,) = model.embed_audio([mel], [stream.conv_caches], [stream.encoder_caches])
        mx.eval(embeds)
        stream.add_audio_embeddings(embeds)
        timings.encode += clock.lap()
    pending = None
    while True:
        step = stream.decoder_input()
        token = None
        if step is not None:
            embeds, tokens = step
            prefill = not stream.prefilled
            logits = model([embeds], [tokens], [stream.decoder_caches], [stream.num_delay_tokens])
            if key is not None:
                key, sub = mx.random.split(key)
            token = sample(logits, temperature, None if key is None else sub)
            stream.advance(embeds.shape[0], token)
            if prefill:
                mx.eval(token)
                timings.prefill += clock.lap()
            else:
                mx.async_eval(token)
        if pending is not None:
            token_id = pending.item()
            timings.decode += clock.lap()
            yield token_id
        if token is None:
            return
        pending = token


def transcribe(
    model,
    audio: AudioSource,
    *,
    delay_ms: Optional[float] = None,
    temperature: float = 0.0,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    progress: Optional[Callable[[float, float], None]] = None,
) -> Transcription:
    """Transcribe a whole recording.

    Args:
        model: a model returned by ``mlx_voxtral.load``.
        audio: a path, encoded bytes, a binary file object, or float32 16 kHz samples.
        delay_ms: transcription delay (multiple of 80 ms, 80 to 2400); default from
            ``tekken.json`` (480 ms).
        temperature: 0 for greedy decoding (recommended), otherwise sampling.
        max_tokens: stop after this many text tokens (``finish_reason="length"``);
            ``None`` transcribes until EOS or the end of the audio.
        seed: random seed for sampling.
        progress: called as ``progress(seconds_done, seconds_total)`` while decoding.

    Raises:
        AudioError, UnsupportedAudioFormatError: unreadable, empty or non-finite audio.
        InvalidRequestError: bad delay, temperature or max_tokens.
    """
    temperature = check_temperature(temperature)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    stream = Stream(model, delay_ms)
    tok = model.tokenizer
    key = mx.random.key(seed) if (temperature > 0 and seed is not None) else None
    timings = Timings(load=getattr(model, "load_time", 0.0))
    token_ids: list[int] = []
    n_text = 0
    finish_reason = "end_of_audio"
    blocks = iter_audio(audio, block_seconds=BLOCK_SECONDS)
    total_seconds = getattr(blocks, "duration", None)
    done = False
    while not done:
        block = next(blocks, None)
        if block is None:
            stream.finish()
        else:
            stream.push(block)
        for token_id in generate_tokens(model, stream, temperature, key, timings):
            token_ids.append(token_id)
            if token_id == tok.eos_id:
                finish_reason, done = "stop", True
                break
            n_text += tok.is_text(token_id)
            if max_tokens is not None and n_text >= max_tokens:
                finish_reason, done = "length", True
                break
        if progress is not None:
            progress(stream.samples / SAMPLE_RATE, total_seconds or stream.samples / SAMPLE_RATE)
        done = done or stream.audio_done
    if stream.samples == 0:
        from .exceptions import AudioError

        raise AudioError("the audio is empty (0 samples)")
    return Transcription(
        text=tok.decode(token_ids).strip(),
        token_ids=token_ids,
        audio_duration=stream.samples / SAMPLE_RATE,
        delay_ms=stream.delay_ms,
        prompt_tokens=len(stream.prompt),
        finish_reason=finish_reason,
        timings=timings,
    )
