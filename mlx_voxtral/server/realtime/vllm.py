"""vLLM's Voxtral realtime dialect.

Client events: ``session.update`` (``model``; optional ``delay_ms`` and
``provisional_delay_ms``, top level or under ``session``; an extension: optional
``audio_format`` ``{"encoding": "pcm_s16le", "sample_rate": N}``, any encoding and rate of
``core.AudioFormat``, for a client that sends audio at its device's rate, which the server
resamples to 16 kHz as ``transcribe`` resamples a file), ``input_audio_buffer.append``
(``audio``: base64 PCM16 LE mono 16 kHz, or the session's ``audio_format``),
``input_audio_buffer.commit`` (``final: true`` ends the audio). Server events:
``session.created``, ``transcription.delta``, ``transcription.word`` (an extension: ``text``,
``start``, ``end`` in seconds of the connection's audio, as each word ends),
``transcription.done`` (with ``usage``) and ``error``. With ``provisional_delay_ms`` (dual
delay, an extension: a delay shorter than ``delay_ms``), ``transcription.provisional``
(``text``: that faster delay's text beyond the final text so far, replacing the previous one). After ``transcription.done`` the next append starts a new transcription on the
same connection.
"""

from __future__ import annotations

from typing import Optional

from ...chat import Usage
from ...exceptions import InvalidRequestError
from ...results import Transcription, Word
from ..errors import APIError
from .core import AudioFormat, LiveSession, Turn, unknown_event


class VLLMSession(LiveSession):
    async def handle(self, event: dict) -> bool:
        kind = event.get("type")
        if kind == "session.update":
            self.check_idle("session.update")
            session = event.get("session") if isinstance(event.get("session"), dict) else event
            model = event.get("model", session.get("model"))
            if model is not None and not isinstance(model, str):
                raise InvalidRequestError("'model' must be a string", "model")
            audio_format = self.audio_format
            if "audio_format" in session:  # checked before anything is set
                fmt = session["audio_format"]
                if not isinstance(fmt, dict):
                    raise InvalidRequestError("'audio_format' must be an object", "audio_format")
                audio_format = AudioFormat(fmt.get("encoding", "pcm_s16le"), fmt.get("sample_rate", 16000))
            if "delay_ms" in session:
                self.delay_ms = self.check_delay(session["delay_ms"])
            if "provisional_delay_ms" in session or "delay_ms" in session:
                self.set_provisional(session.get("provisional_delay_ms", self.provisional_delay_ms))
            self.audio_format = audio_format
        elif kind == "input_audio_buffer.append":
            return await self.append(self.decode_base64(event.get("audio")))
        elif kind == "input_audio_buffer.commit":
            self.start_turn()
            if event.get("final"):
                self.end_turn()
        else:
            await self.send_error(unknown_event(kind), event)
        return True

    async def send_error(self, error: APIError, client_event: Optional[dict] = None) -> None:
        await self.websocket.send_json({"type": "error", **error.body()})

    async def on_delta(self, turn: Turn, delta: str) -> None:
        await self.websocket.send_json({"type": "transcription.delta", "delta": delta})

    async def on_provisional(self, turn: Turn, text: str) -> None:
        await self.websocket.send_json({"type": "transcription.provisional", "text": text})

    async def on_word(self, turn: Turn, word: Word) -> None:
        await self.websocket.send_json({"type": "transcription.word", "text": word.text,
                                        "start": round(turn.offset + word.start, 3),
                                        "end": round(turn.offset + word.end, 3)})

    async def on_done(self, turn: Turn, result: Transcription, usage: Usage) -> None:
        await self.websocket.send_json({"type": "transcription.done", "text": result.text, "usage": {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}})
