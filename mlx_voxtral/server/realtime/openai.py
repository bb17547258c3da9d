"""OpenAI's Realtime API, transcription sessions: the GA shape and the older beta shape.

Client events: ``session.update`` with ``session.type: "transcription"`` (GA; the audio
format under ``session.audio.input.format``, the options under ``.transcription`` and
``.turn_detection``) or ``transcription_session.update`` (beta; ``input_audio_format``
``"pcm16"`` / ``"g711_ulaw"`` / ``"g711_alaw"`` and ``input_audio_transcription``), then
``input_audio_buffer.append`` / ``.commit`` / ``.clear``.

Server events: ``session.created`` / ``.updated`` (beta: ``transcription_session.updated``),
``input_audio_buffer.committed`` / ``.cleared``, ``conversation.item.added`` / ``.done``
(beta: ``conversation.item.created``), ``conversation.item.input_audio_transcription.delta``
(``item_id``, ``content_index``, ``delta``), ``.segment`` (GA) and ``.completed``
(``transcript``, ``usage``), and ``error`` (``type``, ``code``, ``message``, ``param``).

The model is a streaming one: a turn's deltas start as soon as its audio arrives, before
the ``commit`` that ends the turn; ``completed`` follows the commit. The delay: OpenAI's
``transcription.delay`` maps ``minimal`` / ``low`` / ``medium`` / ``high`` / ``xhigh`` to
``DELAYS`` ms; ``transcription.delay_ms`` (an extension) takes any valid delay. Dual delay
(an extension): ``transcription.provisional_delay`` (a name of ``DELAYS``) or
``.provisional_delay_ms``, shorter than the delay, adds
``conversation.item.input_audio_transcription.provisional`` (``item_id``, ``content_index``,
``text``: that faster delay's text beyond the final text so far, replacing the previous one). Turns end
with ``commit``, or, with ``turn_detection: {"type": "server_vad"}`` (``threshold``,
``prefix_padding_ms``, ``silence_duration_ms``), where ``vad.VoiceActivity`` hears them end
(``input_audio_buffer.speech_started`` / ``.speech_stopped``, then ``committed``); the silence
between turns is never decoded. Audio:
``audio/pcm`` (PCM16) at 24 kHz, OpenAI's rate, or any rate given as ``rate`` (an
extension); ``audio/pcmu`` and ``audio/pcma`` at 8 kHz.
"""

from __future__ import annotations

from typing import Optional

from ...chat import Usage
from ...exceptions import InvalidRequestError
from ...results import Transcription
from ..errors import APIError
from .core import AudioFormat, LiveSession, Turn, event_id, unknown_event
from .vad import VoiceActivity

OPENAI_RATE = 24000
DELAYS = {"minimal": 160, "low": 320, "medium": 480, "high": 960, "xhigh": 2400}
_GA_FORMATS = {"audio/pcm": "pcm_s16le", "audio/pcmu": "pcm_mulaw", "audio/pcma": "pcm_alaw"}
_BETA_FORMATS = {"pcm16": ("pcm_s16le", OPENAI_RATE), "g711_ulaw": ("pcm_mulaw", 8000),
                 "g711_alaw": ("pcm_alaw", 8000)}


def _object(value, param: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{param}' must be an object", param)
    return value


class OpenAISession(LiveSession):
    """``beta``: the client spoke the beta shape (its event names are answered)."""

    def __init__(self, api, websocket, beta: bool = False):
        super().__init__(api, websocket)
        self.beta = beta
        self.audio_format = AudioFormat("pcm_s16le", OPENAI_RATE)
        self.transcription: dict = {"model": api.model_name, "language": None, "prompt": None}
        self.previous_item: Optional[str] = None
        self.turn_detection: Optional[dict] = None

    async def send(self, kind: str, **fields) -> None:
        await self.websocket.send_json({"type": kind, "event_id": event_id(), **fields})

    # session ----------------------------------------------------------------------------
    def describe(self) -> dict:
        """The session object ``session.created`` / ``.updated`` carry."""
        f = self.audio_format
        if self.beta:
            kind = {v: k for k, v in _BETA_FORMATS.items()}.get((f.encoding, f.rate), "pcm16")
            return {"id": self.id, "object": "realtime.transcription_session", "input_audio_format": kind,
                    "input_audio_transcription": self._described_transcription(),
                    "turn_detection": self.turn_detection, "modalities": ["text"]}
        fmt = {"type": {v: k for k, v in _GA_FORMATS.items()}[f.encoding]}
        if f.encoding == "pcm_s16le":
            fmt["rate"] = f.rate
        return {"type": "transcription", "id": self.id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt,
                                    "transcription": self._described_transcription(),
                                    "turn_detection": self.turn_detection, "noise_reduction": None}}}

    def _described_transcription(self) -> dict:
        return {**self.transcription, "delay_ms": self.effective_delay_ms,
                "provisional_delay_ms": self.provisional_delay_ms}

    def _transcription(self, options: dict, param: str) -> None:
        for name in ("model", "language", "prompt"):
            value = options.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(f"'{param}.{name}' must be a string", f"{param}.{name}")
        delay = self.delay_ms
        if options.get("delay") is not None:
            if options["delay"] not in DELAYS:
                raise InvalidRequestError(f"'{param}.delay' must be one of {', '.join(DELAYS)}", f"{param}.delay")
            delay = DELAYS[options["delay"]]
        if options.get("delay_ms") is not None:
            delay = self.check_delay(options["delay_ms"], f"{param}.delay_ms")
        self.delay_ms = delay
        provisional = self.provisional_delay_ms
        if options.get("provisional_delay") is not None:
            if options["provisional_delay"] not in DELAYS:
                raise InvalidRequestError(f"'{param}.provisional_delay' must be one of {', '.join(DELAYS)}",
                                          f"{param}.provisional_delay")
            provisional = DELAYS[options["provisional_delay"]]
        if "provisional_delay_ms" in options:
            provisional = options["provisional_delay_ms"]
        self.set_provisional(provisional, f"{param}.provisional_delay_ms")
        self.transcription.update({k: options[k] for k in ("model", "language", "prompt") if k in options})

    def _turn_detection(self, value, param: str) -> None:
        if value is None:
            self.turn_detection, vad = None, None
        else:
            kind = value.get("type") if isinstance(value, dict) else value
            if kind != "server_vad":
                raise InvalidRequestError(f"turn_detection {str(kind)[:32]!r} is not supported: use "
                                          "{'type': 'server_vad'} or null", param)
            options = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
            options.update({k: value[k] for k in options if value.get(k) is not None})
            vad = VoiceActivity(**options, param=param)
            self.turn_detection = {"type": "server_vad", **options}
        self.detect_turns(vad)

    def update_ga(self, session: dict) -> None:
        if session.get("type", "transcription") != "transcription":
            raise InvalidRequestError("this server runs transcription sessions only: session.type must be "
                                      "'transcription'", "session.type")
        audio = _object(_object(session.get("audio"), "session.audio").get("input"), "session.audio.input")
        fmt = _object(audio.get("format"), "session.audio.input.format")
        if fmt:
            kind = fmt.get("type", "audio/pcm")
            if kind not in _GA_FORMATS:
                raise InvalidRequestError(f"session.audio.input.format.type must be one of {', '.join(_GA_FORMATS)}",
                                          "session.audio.input.format.type")
            rate = fmt.get("rate", OPENAI_RATE) if kind == "audio/pcm" else 8000
            self.audio_format = AudioFormat(_GA_FORMATS[kind], rate, "session.audio.input.format.rate")
        self._transcription(_object(audio.get("transcription"), "session.audio.input.transcription"),
                            "session.audio.input.transcription")
        if "turn_detection" in audio:
            self._turn_detection(audio["turn_detection"], "session.audio.input.turn_detection")

    def update_beta(self, session: dict) -> None:
        fmt = session.get("input_audio_format")
        if fmt is not None:
            if fmt not in _BETA_FORMATS:
                raise InvalidRequestError(f"input_audio_format must be one of {', '.join(_BETA_FORMATS)}",
                                          "session.input_audio_format")
            self.audio_format = AudioFormat(*_BETA_FORMATS[fmt])
        self._transcription(_object(session.get("input_audio_transcription"), "session.input_audio_transcription"),
                            "session.input_audio_transcription")
        if "turn_detection" in session:
            self._turn_detection(session["turn_detection"], "session.turn_detection")

    # events -----------------------------------------------------------------------------
    async def handle(self, event: dict) -> bool:
        kind = event.get("type")
        if kind in ("session.update", "transcription_session.update"):
            self.check_idle(kind)
            session = _object(event.get("session"), "session")
            if kind == "session.update":
                self.beta = False
                self.update_ga(session)
            else:
                self.beta = True
                self.update_beta(session)
            self.detect_turns(self.vad)  # the session's resampler follows the format
            await self.send("transcription_session.updated" if self.beta else "session.updated",
                            session=self.describe())
        elif kind == "input_audio_buffer.append":
            return await self.append(self.decode_base64(event.get("audio")))
        elif kind == "input_audio_buffer.commit":
            if self.turn is None:
                await self.send_error(APIError(400, "the input audio buffer is empty: append audio before "
                                               "committing", code="input_audio_buffer_commit_empty"), event)
                return True
            await self.committed(self.end_turn())
        elif kind == "input_audio_buffer.clear":
            self.clear_turn()
            await self.send("input_audio_buffer.cleared")
        else:
            await self.send_error(unknown_event(kind), event)
        return True

    async def committed(self, turn: Turn) -> None:
        await self.send("input_audio_buffer.committed", item_id=turn.id, previous_item_id=self.previous_item)
        item = {"id": turn.id, "type": "message", "role": "user", "status": "in_progress",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.send("conversation.item.created" if self.beta else "conversation.item.added",
                        item=item, previous_item_id=self.previous_item)
        self.previous_item = turn.id

    async def on_speech_started(self, turn: Turn, ms: int) -> None:
        await self.send("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=turn.id)

    async def on_speech_stopped(self, turn: Turn, ms: int) -> None:
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=turn.id)
        await self.committed(turn)

    async def send_error(self, error: APIError, client_event: Optional[dict] = None) -> None:
        client_id = client_event.get("event_id") if isinstance(client_event, dict) else None
        await self.send("error", error={"type": error.type, "code": error.code, "message": error.message,
                                        "param": error.param,
                                        "event_id": client_id if isinstance(client_id, str) else None})

    async def on_delta(self, turn: Turn, delta: str) -> None:
        await self.send("conversation.item.input_audio_transcription.delta", item_id=turn.id, content_index=0,
                        delta=delta)

    async def on_provisional(self, turn: Turn, text: str) -> None:
        await self.send("conversation.item.input_audio_transcription.provisional", item_id=turn.id,
                        content_index=0, text=text)

    async def on_done(self, turn: Turn, result: Transcription, usage: Usage) -> None:
        if not self.beta:
            for i, s in enumerate(result.segments):
                await self.send("conversation.item.input_audio_transcription.segment", item_id=turn.id,
                                content_index=0, id=f"seg_{i}", text=s.text, start=round(turn.offset + s.start, 3),
                                end=round(turn.offset + s.end, 3), speaker="")
        await self.send("conversation.item.input_audio_transcription.completed", item_id=turn.id, content_index=0,
                        transcript=result.text,
                        usage={"type": "tokens", "input_tokens": usage.prompt_tokens,
                               "output_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens,
                               "input_token_details": {"audio_tokens": usage.prompt_tokens, "text_tokens": 0}})
        if not self.beta:
            await self.send("conversation.item.done", item={
                "id": turn.id, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": result.text}]})
