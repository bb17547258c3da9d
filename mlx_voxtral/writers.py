"""Transcript writers: plain text, JSON, SubRip (srt) and WebVTT (vtt)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Union

from .timestamps import Segment

FORMATS = ("txt", "json", "srt", "vtt")


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """``HH:MM:SS.mmm`` (vtt) or ``HH:MM:SS,mmm`` (srt)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def to_txt(result) -> str:
    return result.text + "\n"


def to_dict(result) -> dict:
    """The transcription as JSON-ready data (text, timing, segments with words)."""
    return {
        "text": result.text,
        "duration": round(result.audio_duration, 3),
        "delay_ms": result.delay_ms,
        "finish_reason": result.finish_reason,
        "segments": [
            {"id": i, "start": s.start, "end": s.end, "text": s.text, "words": [asdict(w) for w in s.words]}
            for i, s in enumerate(result.segments)
        ],
        "words": [asdict(w) for w in result.words],
    }


def to_json(result) -> str:
    return json.dumps(to_dict(result), ensure_ascii=False, indent=2) + "\n"


def cue_text(text: str) -> str:
    """Segment text made safe for a subtitle cue: one line, no blank line, no ``-->``."""
    return " ".join(text.split()).replace("-->", "->")


def to_srt(segments: list[Segment]) -> str:
    blocks = [
        f"{i}\n{format_timestamp(s.start, ',')} --> {format_timestamp(s.end, ',')}\n{cue_text(s.text)}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[Segment]) -> str:
    blocks = [f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{cue_text(s.text)}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(result, fmt: str) -> str:
    """The transcription in one of ``FORMATS``."""
    if fmt == "txt":
        return to_txt(result)
    if fmt == "json":
        return to_json(result)
    if fmt == "srt":
        return to_srt(result.segments)
    if fmt == "vtt":
        return to_vtt(result.segments)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write(result, path: Union[str, Path], fmt: str) -> Path:
    path = Path(path)
    path.write_text(render(result, fmt), encoding="utf-8")
    return path


def write_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to ``path`` so that ``path`` is either absent or complete: the text goes
    to a hidden temporary file beside it, which is then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
