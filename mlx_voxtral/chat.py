"""Chat-completion shapes shared by the mistral.rs-style ``Runner`` and the HTTP server.

Voxtral Realtime is a transcription model: a chat request is a carrier for audio. Every
``audio_url`` / ``input_audio`` part of the messages is transcribed, in order, and the
texts are joined with a newline; ``text`` parts (instructions) are accepted and ignored,
because the realtime model takes no text prompt.

``max_tokens`` caps the *text* tokens of the whole answer (``[STREAMING_PAD]`` and word
markers do not count). When the cap is hit the answer ends with ``finish_reason="length"``;
otherwise the audio is transcribed to its end and ``finish_reason`` is ``"stop"``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .audio_url import SourcePolicy, decode_input_audio, read_audio_url
from .exceptions import InvalidRequestError, VoxtralError
from .validate import check_max_tokens, check_n, check_temperature

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_SEPARATOR = "\n"  # between the transcripts of several audio parts


# requests -------------------------------------------------------------------------------
@dataclass
class ChatCompletionRequest:
    """A chat completion request, with mistral.rs's Python field names.

    Only ``messages``, ``max_tokens``, ``temperature`` and ``stream`` change what the model
    does; the other sampling fields are accepted for compatibility and have no effect on a
    transcription model (``top_p``/``top_k``/``min_p`` would only matter when sampling).
    """

    messages: list
    model: str = "default"
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    stream: bool = False
    n_choices: int = 1
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    stop_seqs: Optional[list] = None
    logit_bias: Optional[dict] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    delay_ms: Optional[int] = None  # mlx_voxtral extension: transcription delay
    extra: dict = field(default_factory=dict)


def check_options(max_tokens: Any, temperature: Any, n_choices: Any = 1,
                  max_temperature: Optional[float] = None) -> tuple[Optional[int], float]:
    """Validated ``(max_tokens, temperature)``; ``temperature=None`` means greedy."""
    max_tokens = check_max_tokens(max_tokens)
    temperature = 0.0 if temperature is None else check_temperature(temperature, max_temperature)
    check_n(n_choices)
    return max_tokens, temperature


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _part_audio(part: Any, where: str, policy: SourcePolicy) -> Optional[bytes]:
    """The audio bytes of one content part, or None for a text part."""
    if isinstance(part, str):
        return None
    kind = _field(part, "type")
    if kind == "text":
        if not isinstance(_field(part, "text"), str):
            raise InvalidRequestError(f"{where}: a text part needs a 'text' string")
        return None
    if kind == "audio_url":
        url = _field(part, "audio_url")
        if not isinstance(url, str):
            url = _field(url, "url") if url is not None else None
        if not isinstance(url, str):
            raise InvalidRequestError(f"{where}: audio_url must be a string or an object with a 'url' string")
        return read_audio_url(url, policy)
    if kind == "input_audio":
        return decode_input_audio(_field(part, "input_audio"), policy.max_bytes)
    if kind is None:
        raise InvalidRequestError(f"{where}: content part has no 'type'")
    raise InvalidRequestError(
        f"{where}: unsupported content part type {kind!r} (use audio_url, input_audio or text)"
    )


def audio_inputs(messages: Any, policy: Optional[SourcePolicy] = None) -> list[bytes]:
    """The encoded audio of every audio part of ``messages``, in order.

    Raises ``InvalidRequestError`` for malformed messages, a part that may not be read under
    ``policy`` (``ForbiddenSourceError``), or a request without any audio; its ``param`` is
    ``"messages"``.
    """
    try:
        return _audio_inputs(messages, policy or SourcePolicy())
    except VoxtralError as e:
        e.param = e.param or "messages"
        raise


def _audio_inputs(messages: Any, policy: SourcePolicy) -> list[bytes]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list")
    audio: list[bytes] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) and not hasattr(message, "content"):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = _field(message, "role")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = _field(message, "content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, (dict, str)) and not hasattr(part, "type"):
                raise InvalidRequestError(f"messages[{i}].content[{j}] must be an object")
            data = _part_audio(part, f"messages[{i}].content[{j}]", policy)
            if data is not None:
                audio.append(data)
    if not audio:
        raise InvalidRequestError(
            "the request has no audio: add an audio_url or input_audio content part "
            "(Voxtral Realtime transcribes audio; text instructions are ignored)"
        )
    return audio


# responses ------------------------------------------------------------------------------
@dataclass
class Usage:
    """Token counts and speeds, as mistral.rs reports them.

    ``prompt_tokens`` counts the decoder's prompt positions (left padding and delay tokens;
    the audio is added to every position). ``completion_tokens`` counts every generated
    token, ``[STREAMING_PAD]`` included, since each one is a decoder step.
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    avg_tok_per_sec: float
    avg_prompt_tok_per_sec: float
    avg_compl_tok_per_sec: float
    total_time_sec: float
    total_prompt_time_sec: float
    total_completion_time_sec: float

    @classmethod
    def from_results(cls, results: list) -> "Usage":
        """Summed over the transcriptions of one request."""
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(len(r.token_ids) for r in results)
        prompt_time = sum(r.timings.encode + r.timings.prefill for r in results)
        completion_time = sum(r.timings.decode for r in results)
        total_time = prompt_time + completion_time

        def rate(n: int, t: float) -> float:
            return round(n / t, 3) if t > 0 else 0.0

        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            avg_tok_per_sec=rate(prompt + completion, total_time),
            avg_prompt_tok_per_sec=rate(prompt, prompt_time),
            avg_compl_tok_per_sec=rate(completion, completion_time),
            total_time_sec=round(total_time, 4),
            total_prompt_time_sec=round(prompt_time, 4),
            total_completion_time_sec=round(completion_time, 4),
        )


@dataclass
class ResponseMessage:
    content: str
    role: str = "assistant"
    tool_calls: Optional[list] = None


@dataclass
class Choice:
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: Optional[Any] = None


@dataclass
class ChatCompletionResponse:
    id: str
    choices: list[Choice]
    created: int
    model: str
    usage: Usage
    system_fingerprint: str = "mlx-voxtral"
    object: str = "chat.completion"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Delta:
    content: Optional[str] = None
    role: Optional[str] = None


@dataclass
class ChunkChoice:
    index: int
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: Optional[Any] = None


@dataclass
class ChatCompletionChunkResponse:
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    usage: Optional[Usage] = None
    system_fingerprint: str = "mlx-voxtral"
    object: str = "chat.completion.chunk"

    def to_dict(self) -> dict:
        return asdict(self)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(results: list) -> str:
    """OpenAI's finish reason for a request: "length" if max_tokens cut it, else "stop"."""
    return "length" if results and results[-1].finish_reason == "length" else "stop"


def joined_text(results: list) -> str:
    return PART_SEPARATOR.join(r.text for r in results)


def completion_response(request_id: str, model: str, results: list, created: Optional[int] = None) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=request_id,
        choices=[Choice(0, ResponseMessage(joined_text(results)), finish_reason(results))],
        created=created or int(time.time()),
        model=model,
        usage=Usage.from_results(results),
    )


def chunk(request_id: str, model: str, created: int, *, content: Optional[str] = None,
          role: Optional[str] = None, finish: Optional[str] = None,
          usage: Optional[Usage] = None, choices: bool = True) -> ChatCompletionChunkResponse:
    """One streamed chunk; ``choices=False`` gives the usage-only final chunk."""
    return ChatCompletionChunkResponse(
        id=request_id,
        choices=[ChunkChoice(0, Delta(content, role), finish)] if choices else [],
        created=created,
        model=model,
        usage=usage,
    )
