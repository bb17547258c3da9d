"""Mistral's realtime transcription API (``/v1/audio/transcriptions/realtime``), the one the
``mistralai`` SDK's ``client.audio.realtime.transcribe_stream`` speaks.

Client events: ``session.update`` (``session.audio_format``: ``encoding`` and
``sample_rate``; ``target_streaming_delay_ms``; ``language``), ``input_audio.append``
(``audio``: base64), ``input_audio.flush`` (ends the turn: its text follows) and
``input_audio.end`` (ends the session once the text is out). Server events:
``session.created`` / ``.updated`` (the session), ``transcription.text.delta`` (``text``),
``transcription.segment`` (``text``, ``start``, ``end``, seconds of the session),
``transcription.done`` (``text``, ``segments``, ``usage``) and ``error`` (``message``,
``code``: the HTTP status).

``target_streaming_delay_ms`` is the model's delay: a multiple of 80 from 80 to 2400.
``provisional_streaming_delay_ms`` (an extension) turns dual delay on: a shorter delay whose
text beyond the final text so far comes as ``transcription.text.provisional`` (``text``,
replacing the previous one).
The model does not detect the language, so ``transcription.language`` is never sent and
``done.language`` is the ``language`` the client gave, or null. With ``turn_detection``
(``start_threshold``, ``min_silence_ms``) the server ends turns where ``vad.VoiceActivity``
hears speech stop (``turn.start`` / ``turn.end`` events); silence is never decoded.
"""

from __future__ import annotations

import math
from typing import Optional

from ...chat import Usage
from ...exceptions import InvalidRequestError
from ...results import Transcription
from ..errors import APIError
from .core import AudioFormat, LiveSession, Turn, unknown_event
from .vad import VoiceActivity


class MistralSession(LiveSession):
    def __init__(self, api, websocket, model: Optional[str] = None):
        super().__init__(api, websocket)
        self.model = model or api.model_name
        self.language: Optional[str] = None
        self.turn_detection: Optional[dict] = None

    def describe(self) -> dict:
        return {"request_id": self.id, "model": self.model,
                "audio_format": {"encoding": self.audio_format.encoding, "sample_rate": self.audio_format.rate},
                "target_streaming_delay_ms": self.effective_delay_ms,
                "provisional_streaming_delay_ms": self.provisional_delay_ms, "language": self.language,
                "turn_detection": self.turn_detection}

    async def handle(self, event: dict) -> bool:
        kind = event.get("type")
        if kind == "session.update":
            self.check_idle("session.update")
            session = event.get("session")
            if not isinstance(session, dict):
                raise InvalidRequestError("session.update needs a 'session' object", "session")
            fmt = session.get("audio_format")
            if fmt is not None:
                if not isinstance(fmt, dict):
                    raise InvalidRequestError("'audio_format' must be an object", "audio_format")
                self.audio_format = AudioFormat(fmt.get("encoding", "pcm_s16le"), fmt.get("sample_rate", 16000))
                self.detect_turns(self.vad)  # the session's resampler follows the format
            if session.get("target_streaming_delay_ms") is not None:
                self.delay_ms = self.check_delay(session["target_streaming_delay_ms"], "target_streaming_delay_ms")
            self.set_provisional(session.get("provisional_streaming_delay_ms", self.provisional_delay_ms),
                                 "provisional_streaming_delay_ms")
            if "turn_detection" in session:
                self.set_turn_detection(session["turn_detection"])
            language = session.get("language")
            if language is not None and not isinstance(language, str):
                raise InvalidRequestError("'language' must be a string", "language")
            self.language = language or self.language
            await self.websocket.send_json({"type": "session.updated", "session": self.describe()})
        elif kind == "input_audio.append":
            return await self.append(self.decode_base64(event.get("audio")))
        elif kind == "input_audio.flush":
            self.end_turn()
        elif kind == "input_audio.end":
            self.finish_session()
        else:
            await self.send_error(unknown_event(kind), event)
        return True

    def set_turn_detection(self, value) -> None:
        if value is None:
            self.turn_detection, vad = None, None
        else:
            if not isinstance(value, dict):
                raise InvalidRequestError("'turn_detection' must be an object or null", "turn_detection")
            options = {"start_threshold": 0.5, "min_silence_ms": 500}
            options.update({k: value[k] for k in options if value.get(k) is not None})
            vad = VoiceActivity(options["start_threshold"], 300, options["min_silence_ms"], "turn_detection")
            self.turn_detection = options
        self.detect_turns(vad)

    async def on_speech_started(self, turn: Turn, ms: int) -> None:
        await self.websocket.send_json({"type": "turn.start", "time_s": ms / 1000})

    async def on_speech_stopped(self, turn: Turn, ms: int) -> None:
        await self.websocket.send_json({"type": "turn.end", "time_s": ms / 1000, "end_reason": "threshold"})

    async def send_error(self, error: APIError, client_event: Optional[dict] = None) -> None:
        await self.websocket.send_json({"type": "error", "error": {"message": error.message, "code": error.status}})

    async def on_delta(self, turn: Turn, delta: str) -> None:
        await self.websocket.send_json({"type": "transcription.text.delta", "text": delta})

    async def on_provisional(self, turn: Turn, text: str) -> None:
        await self.websocket.send_json({"type": "transcription.text.provisional", "text": text})

    async def on_done(self, turn: Turn, result: Transcription, usage: Usage) -> None:
        segments = [{"type": "transcription_segment", "text": s.text, "start": round(turn.offset + s.start, 3),
                     "end": round(turn.offset + s.end, 3)} for s in result.segments]
        for s in segments:
            await self.websocket.send_json({**s, "type": "transcription.segment"})
        await self.websocket.send_json({
            "type": "transcription.done", "model": self.model, "text": result.text, "language": self.language,
            "segments": segments,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.total_tokens, "prompt_audio_seconds": math.ceil(result.audio_duration)}})
