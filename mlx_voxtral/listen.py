"""Live transcription to the terminal: ``mlx-voxtral listen``.

Audio comes from the microphone (``sounddevice``, the optional ``listen`` extra) or, with
``--from-file``, from a file fed at real-time pace, so the live path can be exercised on a
machine without a microphone. Either way it goes through ``stream_transcribe`` in 100 ms
chunks and text is printed as soon as the model decides it.
"""

from __future__ import annotations

import queue
import sys
import time
from typing import Iterator, Optional, TextIO

import numpy as np

from .audio import SAMPLE_RATE, iter_audio
from .exceptions import VoxtralError
from .generate import Done, StreamReset, TextDelta, Word, stream_transcribe

CHUNK_SECONDS = 0.1


def file_chunks(path: str, speed: float = 1.0) -> Iterator[np.ndarray]:
    """A file's audio in 100 ms chunks, paced at ``speed`` x real time (0: no pacing)."""
    if speed < 0:
        raise VoxtralError(f"--speed must be >= 0, got {speed}")
    start = time.perf_counter()
    sent = 0
    for block in iter_audio(path, block_seconds=CHUNK_SECONDS):
        if speed > 0:
            wait = start + sent / SAMPLE_RATE / speed - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        sent += block.shape[0]
        yield block


def microphone_chunks(device=None) -> Iterator[np.ndarray]:
    """Microphone audio (mono, 16 kHz) until Ctrl-C."""
    try:
        import sounddevice as sd
    except ImportError as e:  # the optional extra, or PortAudio, is missing
        raise VoxtralError(
            "live microphone input needs sounddevice: pip install 'mlx-voxtral[listen]' "
            f"(and the PortAudio library); or use --from-file ({e})"
        ) from e
    chunks: queue.Queue = queue.Queue()

    def callback(indata, frames, time_info, status):
        chunks.put(indata[:, 0].copy())

    try:
        stream = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=device,
                                blocksize=int(SAMPLE_RATE * CHUNK_SECONDS), callback=callback)
    except Exception as e:  # PortAudioError, bad device name, no input device
        raise VoxtralError(f"cannot open the microphone: {e}") from e
    with stream:
        print("listening (Ctrl-C to stop) ...", file=sys.stderr)
        try:
            while True:
                yield chunks.get()
        except KeyboardInterrupt:
            return


def listen(
    model,
    from_file: Optional[str] = None,
    *,
    delay_ms: Optional[int] = None,
    temperature: float = 0.0,
    device=None,
    speed: float = 1.0,
    show_words: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print a live transcription; returns the exit code."""
    chunks = file_chunks(from_file, speed) if from_file else microphone_chunks(device)
    started = time.perf_counter()
    first_text: Optional[float] = None
    at_line_start = True
    for event in stream_transcribe(model, chunks, delay_ms=delay_ms, temperature=temperature):
        if isinstance(event, TextDelta):
            text = event.text.lstrip() if at_line_start else event.text
            if text:
                if first_text is None:
                    first_text = time.perf_counter() - started
                out.write(text)
                out.flush()
                at_line_start = False
        elif isinstance(event, Word) and show_words:
            print(f"[{event.start:8.2f} - {event.end:8.2f}] {event.text}", file=err)
        elif isinstance(event, StreamReset):
            if not at_line_start:
                out.write("\n")
                at_line_start = True
        elif isinstance(event, Done):
            if not at_line_start:
                out.write("\n")
            out.flush()
            result = event.result
            wall = time.perf_counter() - started
            latency = "no text" if first_text is None else f"first text after {first_text:.2f} s"
            print(f"{result.audio_duration:.1f} s of audio in {wall:.1f} s ({latency})", file=err)
    return 0
