"""A ``Runner`` with mistral.rs's Python API, so its Voxtral examples run unchanged.

    from mlx_voxtral import Runner, Which, ChatCompletionRequest, VisionArchitecture

    runner = Runner(
        which=Which.VisionPlain(
            model_id="mistralai/Voxtral-Mini-4B-Realtime-2602",
            arch=VisionArchitecture.Voxtral,
        ),
        in_situ_quant="Q4K",
    )
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="ignore",
        messages=[{"role": "user", "content": [
            {"type": "audio_url", "audio_url": {"url": "path/to/audio.wav"}},
            {"type": "text", "text": "Transcribe this audio."},
        ]}],
        max_tokens=256,
        temperature=0.1,
    ))
    print(res.choices[0].message.content)

The request/response shapes and their semantics (audio parts, ``max_tokens``) are in
``mlx_voxtral.chat``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Optional, Union

from .audio import iter_audio
from .audio_url import SourcePolicy
from .chat import (
    PART_SEPARATOR,
    ChatCompletionChunkResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
    audio_inputs,
    check_options,
    chunk,
    completion_id,
    completion_response,
    finish_reason,
)
from .exceptions import InvalidRequestError
from .generate import stream_transcribe, transcribe
from .results import DeltaText, Done
from .loader import load

# Live streaming granularity for ``stream=True`` (the tokens do not depend on it).
STREAM_BLOCK_SECONDS = 1.0


class VisionArchitecture(Enum):
    """The architectures this package runs (mistral.rs names them this way)."""

    Voxtral = "voxtral"


MultimodalArchitecture = VisionArchitecture


@dataclass
class _ModelSpec:
    model_id: str
    arch: Optional[VisionArchitecture] = None


class Which:
    """Model selectors, as in mistral.rs (``Which.VisionPlain`` / ``Which.MultimodalPlain``)."""

    @staticmethod
    def VisionPlain(model_id: str, arch: Optional[VisionArchitecture] = None, **_ignored) -> _ModelSpec:
        """``model_id``: a Hugging Face repo id or a local folder (native or converted)."""
        return _ModelSpec(model_id, arch)

    MultimodalPlain = VisionPlain


_ISQ_BITS = {
    "2": 2, "AFQ2": 2, "3": 3, "AFQ3": 3, "5": 5, "6": 6, "AFQ6": 6,
    "4": 4, "Q4K": 4, "Q4_K": 4, "Q4_0": 4, "Q4_1": 4, "AFQ4": 4,
    "8": 8, "Q8_0": 8, "Q8_1": 8, "Q8K": 8, "Q8_K": 8, "AFQ8": 8,
}


def isq_bits(in_situ_quant: Union[None, str, int]) -> Optional[int]:
    """mistral.rs's ISQ names mapped to MLX group-wise affine bits (2, 3, 4, 5, 6 or 8)."""
    if in_situ_quant is None:
        return None
    bits = _ISQ_BITS.get(str(in_situ_quant).upper())
    if bits is None:
        raise InvalidRequestError(
            f"unsupported in_situ_quant {in_situ_quant!r}; use one of "
            "'4', 'Q4K', 'Q4_0', 'Q4_1', 'AFQ4' (4-bit), '8', 'Q8_0', 'Q8_1', 'AFQ8' (8-bit), "
            "'2'/'AFQ2', '3'/'AFQ3', '5', '6'/'AFQ6'"
        )
    return bits


class Runner:
    """Loads a Voxtral Realtime model once and answers chat completion requests.

    Args:
        which: ``Which.VisionPlain(model_id=..., arch=VisionArchitecture.Voxtral)``.
        in_situ_quant: ``None`` (checkpoint precision), a 4-bit name (``"4"``, ``"Q4K"``,
            ``"Q4_0"``), an 8-bit name (``"8"``, ``"Q8_0"``) or another affine width (``"AFQ2"``,
            ``"AFQ3"``, ``"5"``, ``"AFQ6"``): group-wise quantization
            while loading. A pre-quantized folder loads as it is.
        group_size: quantization group size (32, 64 or 128; default 64).
        quantize_mode: ``"affine"`` (default), or ``"mxfp4"``/``"nvfp4"`` (with a 4-bit
            ``in_situ_quant``) or ``"mxfp8"`` (8-bit), as ``mlx_voxtral.load``'s ``mode``.
        seed: random seed for requests with ``temperature > 0``.
        allow_local_files / allow_remote_urls: what ``audio_url`` may point to (the
            Python API allows both by default).
        backend / dtype: as for ``mlx_voxtral.load``.
        Other mistral.rs options (``max_seqs``, ``token_source``, ...) are accepted and
        have no effect here.
    """

    def __init__(
        self,
        which: _ModelSpec,
        in_situ_quant: Union[None, str, int] = None,
        *,
        group_size: Optional[int] = None,
        quantize_mode: str = "affine",
        seed: Optional[int] = None,
        delay_ms: Optional[int] = None,
        allow_local_files: bool = True,
        allow_remote_urls: bool = True,
        backend: Optional[str] = None,
        dtype: Optional[str] = None,
        **_ignored,
    ):
        if not isinstance(which, _ModelSpec):
            raise InvalidRequestError("which must be Which.VisionPlain(model_id=..., arch=VisionArchitecture.Voxtral)")
        if which.arch not in (None, VisionArchitecture.Voxtral):
            raise InvalidRequestError(f"mlx_voxtral runs the Voxtral architecture only, got {which.arch!r}")
        self.model_id = which.model_id
        self.model = load(which.model_id, dtype=dtype, quantize=isq_bits(in_situ_quant), group_size=group_size,
                          backend=backend, mode=quantize_mode)
        self.seed = seed
        self.delay_ms = delay_ms
        self.policy = SourcePolicy(local_root="*" if allow_local_files else None, allow_remote=allow_remote_urls)

    def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> Union[ChatCompletionResponse, Iterator[ChatCompletionChunkResponse]]:
        """Transcribe the request's audio parts. ``stream=True`` returns an iterator of chunks.

        Raises ``InvalidRequestError`` (or an ``AudioError``) for a bad request, before any
        chunk is produced.
        """
        max_tokens, temperature = check_options(request.max_tokens, request.temperature, request.n_choices)
        audios = audio_inputs(request.messages, self.policy)
        seed = request.seed if request.seed is not None else self.seed
        delay_ms = request.delay_ms if request.delay_ms is not None else self.delay_ms
        self.model.tokenizer.check_delay(delay_ms)
        options = dict(delay_ms=delay_ms, temperature=temperature, seed=seed)
        if request.stream:
            return self._stream(request.model, audios, max_tokens, options)
        results = []
        for audio in audios:
            remaining = None if max_tokens is None else max_tokens - sum(r.text_tokens for r in results)
            result = transcribe(self.model, audio, max_tokens=remaining, **options)
            results.append(result)
            if result.finish_reason == "length":
                break
        return completion_response(completion_id(), request.model, results)

    def _stream(self, model_name: str, audios: list[bytes], max_tokens, options) -> Iterator[ChatCompletionChunkResponse]:
        request_id, created = completion_id(), int(time.time())
        yield chunk(request_id, model_name, created, content="", role="assistant")
        results = []
        for i, audio in enumerate(audios):
            remaining = None if max_tokens is None else max_tokens - sum(r.text_tokens for r in results)
            blocks = iter_audio(audio, block_seconds=STREAM_BLOCK_SECONDS)
            text = DeltaText()  # deltas that join to the part's stripped text
            for event in stream_transcribe(self.model, blocks, max_tokens=remaining, **options):
                piece = text.add(event)
                if piece:
                    yield chunk(request_id, model_name, created, content=piece)
                elif isinstance(event, Done):
                    results.append(event.result)
            if results[-1].finish_reason == "length":
                break
            if i + 1 < len(audios):
                yield chunk(request_id, model_name, created, content=PART_SEPARATOR)
        yield chunk(request_id, model_name, created, finish=finish_reason(results), usage=Usage.from_results(results))
