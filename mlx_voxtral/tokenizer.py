"""Thin wrapper over mistral-common's Tekkenizer and its streaming-transcription encoding."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from .exceptions import CheckpointError
from .validate import MAX_DELAY_MS, check_delay


class Tokenizer:
    """Prompt ids, audio padding and detokenisation, all taken from ``tekken.json``."""

    def __init__(self, path: str | Path):
        try:
            self._mistral = MistralTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot load tokenizer {path}: {e}") from e
        self.instruct = self._mistral.instruct_tokenizer
        self.tekken = self.instruct.tokenizer
        self.audio_encoder = getattr(self.instruct, "audio_encoder", None)
        if self.audio_encoder is None or not self.audio_encoder.audio_config.is_streaming:
            raise CheckpointError(
                f"{path} has no streaming audio section: not a Voxtral Realtime tokenizer"
            )
        self.audio_config = self.audio_encoder.audio_config
        self.bos_id: int = self.tekken.bos_id
        self.eos_id: int = self.tekken.eos_id
        self.streaming_pad_id: int = self.tekken.get_special_token(SpecialTokens.streaming_pad.value)
        self.streaming_word_id: Optional[int] = (
            self.tekken.get_special_token(SpecialTokens.streaming_word.value)
            if self.tekken.is_special(SpecialTokens.streaming_word.value)
            else None
        )
        self.num_special_tokens: int = self.tekken.num_special_tokens

    @property
    def sample_rate(self) -> int:
        return self.audio_config.sampling_rate

    @property
    def samples_per_token(self) -> int:
        """Audio samples per decoder position (1280 = 80 ms)."""
        return self.audio_config.raw_audio_length_per_tok

    @property
    def mel_frames_per_token(self) -> int:
        return self.audio_config.audio_length_per_tok

    @property
    def token_ms(self) -> float:
        return self.audio_config.frame_duration_ms

    @property
    def default_delay_ms(self) -> int:
        return int(self.audio_config.transcription_delay_ms)

    def check_delay(self, delay_ms: Optional[float]) -> int:
        """Validate a delay (a multiple of 80 ms in [80, 2400]); ``None`` means the default."""
        return check_delay(delay_ms, self.token_ms, self.default_delay_ms)

    @property
    def max_prompt_length(self) -> int:
        """The longest decoder prompt: BOS, the left pad and the longest delay, in tokens."""
        return len(self.prompt(MAX_DELAY_MS))

    def num_delay_tokens(self, delay_ms: Optional[float] = None) -> int:
        return self.audio_config.get_num_delay_tokens(self.check_delay(delay_ms))

    def prompt(self, delay_ms: Optional[float] = None) -> list[int]:
        """``[BOS] + [STREAMING_PAD] * (left pad + delay tokens)``, as mistral-common encodes it."""
        delay_ms = self.check_delay(delay_ms)
        return self.instruct.start() + self.audio_encoder.encode_streaming_tokens(delay_ms)

    def padding(self, delay_ms: Optional[float] = None) -> tuple[int, int]:
        """Samples of silence before the audio and after it (before token alignment)."""
        left, right = self.audio_encoder.get_padding_audio(self.check_delay(delay_ms))
        return left.audio_array.shape[0], right.audio_array.shape[0]

    def pad_audio(self, audio: np.ndarray, delay_ms: Optional[float] = None) -> np.ndarray:
        """Offline padding: left silence, audio, token alignment and right silence."""
        return self.audio_encoder.pad(audio, self.sample_rate, self.check_delay(delay_ms))

    def is_text(self, token_id: int) -> bool:
        return token_id >= self.num_special_tokens

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with every special token (pads, word marks, BOS/EOS) dropped."""
        return self.tekken.decode([int(i) for i in ids], special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; empty for special tokens."""
        if not self.is_text(token_id):
            return b""
        return self.tekken.id_to_byte_piece(int(token_id), SpecialTokenPolicy.IGNORE)


class StreamingDetokenizer:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
