"""Server-side voice activity detection: where turns start and end, so that the silence
between them is never decoded.

WebRTC's VAD (``webrtcvad-wheels``: a few microseconds per 30 ms frame, BENCHMARKS.md) judges
each 30 ms frame of the session's 16 kHz audio. A turn starts at the first speech frame,
``prefix_padding_ms`` earlier (the audio before it is kept), and stops after
``silence_duration_ms`` of non-speech frames, which are part of the turn. Times are
milliseconds of the session's 16 kHz audio (16 samples each).
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np

from ...exceptions import InvalidRequestError

FRAME = 480  # samples: 30 ms at 16 kHz
FRAME_MS = 30


class VoiceActivity:
    """Feed 16 kHz audio in; get ``("start", ms, samples)``, ``("audio", samples)`` and
    ``("stop", ms)`` out (``samples``: what the current turn is given).

    ``threshold`` (0 to 1, like OpenAI's): how sure the detector must be that a frame is
    speech; it picks WebRTC's aggressiveness (0: below 0.25 ... 3: 0.75 and above).
    """

    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500,
                 param: str = "turn_detection"):
        try:
            import webrtcvad
        except ImportError:  # pragma: no cover - a dependency of the serve extra
            raise InvalidRequestError("server-side turn detection needs webrtcvad-wheels "
                                      "(pip install 'mlx-voxtral[serve]')", param) from None
        for name, value, low, high in (("threshold", threshold, 0.0, 1.0),
                                       ("prefix_padding_ms", prefix_padding_ms, 0, 10_000),
                                       ("silence_duration_ms", silence_duration_ms, FRAME_MS, 10_000)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidRequestError(f"'{param}.{name}' must be a number from {low} to {high}",
                                          f"{param}.{name}")
        self._vad = webrtcvad.Vad(min(3, int(threshold * 4)))
        self._prefix = collections.deque(maxlen=round(prefix_padding_ms / FRAME_MS))
        self._silence_frames = max(1, round(silence_duration_ms / FRAME_MS))
        self._rest = np.zeros(0, np.float32)
        self.position = 0  # samples of the session's audio judged (or flushed)
        self.speaking = False
        self._quiet = 0

    def __call__(self, audio: np.ndarray) -> list:
        audio = np.concatenate([self._rest, audio]) if self._rest.shape[0] else audio
        n = audio.shape[0] // FRAME * FRAME
        self._rest = audio[n:].copy()
        events: list = []
        pcm = (np.clip(audio[:n], -1.0, 32767 / 32768) * 32768).astype("<i2")
        for i in range(0, n, FRAME):
            frame = audio[i:i + FRAME]
            speech = self._vad.is_speech(pcm[i:i + FRAME].tobytes(), 16000)
            self.position += FRAME
            if not self.speaking:
                if speech:
                    start = (self.position - FRAME - sum(p.shape[0] for p in self._prefix)) // 16
                    events.append(("start", start, np.concatenate([*self._prefix, frame])))
                    self._prefix.clear()
                    self.speaking, self._quiet = True, 0
                elif self._prefix.maxlen:
                    self._prefix.append(frame)
                continue
            self._quiet = 0 if speech else self._quiet + 1
            if events and events[-1][0] == "audio":
                events[-1] = ("audio", np.concatenate([events[-1][1], frame]))
            else:
                events.append(("audio", frame))
            if self._quiet >= self._silence_frames:
                events.append(("stop", self.position // 16))
                self.speaking = False
        return events

    def flush(self) -> Optional[np.ndarray]:
        """The partial frame held back, while a turn is open (the client ends the turn)."""
        rest, self._rest = self._rest, np.zeros(0, np.float32)
        self.position += rest.shape[0]
        return rest if self.speaking and rest.shape[0] else None

    def stop(self) -> None:
        """The turn was ended by the client (a commit): wait for the next speech."""
        self.speaking, self._quiet = False, 0
        self._prefix.clear()
