"""Resolve the audio of an OpenAI-style message part to bytes.

``audio_url`` parts may carry a ``data:audio/...;base64,`` URL, a local path or ``file://``
URL, or an ``http(s)://`` URL; ``input_audio`` parts carry ``{"data": base64, "format"}``.
What is allowed is a ``SourcePolicy``: the Python API allows everything, the server only
what its flags enable (local files under one folder, remote URLs with size/time limits).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .exceptions import InvalidRequestError

MAX_AUDIO_BYTES = 100 * 1024 * 1024

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


class ForbiddenSourceError(InvalidRequestError):
    """An audio location this caller may not read (local file or remote URL not allowed)."""


class AudioTooLargeError(InvalidRequestError):
    """Audio larger than the policy's ``max_bytes``."""


@dataclass
class SourcePolicy:
    """Which audio locations may be read.

    ``local_root``: ``None`` forbids local paths; a folder allows files inside it only;
    ``"*"`` allows any readable file (the Python API's default).
    """

    local_root: Optional[str] = "*"
    allow_remote: bool = True
    max_bytes: int = MAX_AUDIO_BYTES
    timeout: float = 30.0


def _b64decode(data: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"{what} is not valid base64: {e}") from e


def decode_data_url(url: str, max_bytes: int = MAX_AUDIO_BYTES) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequestError("malformed data URL (expected data:audio/<type>;base64,<data>)")
    mime = match.group("mime") or "text/plain"
    if not (mime.startswith("audio/") or mime.startswith("video/") or mime == "application/octet-stream"):
        raise InvalidRequestError(f"data URL has media type {mime!r}; expected audio/*")
    if not match.group("b64"):
        raise InvalidRequestError("data URL must be base64-encoded (;base64,)")
    if len(match.group("data")) * 3 // 4 > max_bytes:
        raise AudioTooLargeError(f"audio exceeds the {max_bytes} byte limit")
    return _b64decode(match.group("data"), "data URL payload")


def decode_input_audio(part: dict, max_bytes: int = MAX_AUDIO_BYTES) -> bytes:
    """OpenAI's ``input_audio``: ``{"data": "<base64>", "format": "wav" | "mp3" | ...}``."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise InvalidRequestError("input_audio must be an object with a base64 'data' string")
    fmt = part.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise InvalidRequestError("input_audio.format must be a string")
    if len(part["data"]) * 3 // 4 > max_bytes:
        raise AudioTooLargeError(f"audio exceeds the {max_bytes} byte limit")
    data = _b64decode(part["data"], "input_audio.data")
    if not data:
        raise InvalidRequestError("input_audio.data is empty")
    return data


def _read_local(path: str, policy: SourcePolicy) -> bytes:
    if policy.local_root is None:
        raise ForbiddenSourceError("local files are not allowed as audio_url (server flag --allow-local-files)")
    real = Path(os.path.realpath(path))
    if policy.local_root != "*":
        root = Path(os.path.realpath(policy.local_root))
        if real != root and root not in real.parents:
            raise ForbiddenSourceError(f"audio_url path is outside the allowed folder {root}")
    if not real.is_file():
        raise InvalidRequestError(f"audio file not found: {path}")
    if real.stat().st_size > policy.max_bytes:
        raise AudioTooLargeError(f"audio exceeds the {policy.max_bytes} byte limit")
    return real.read_bytes()


def _read_remote(url: str, policy: SourcePolicy) -> bytes:
    if not policy.allow_remote:
        raise ForbiddenSourceError("remote audio URLs are not allowed (server flag --allow-remote-urls)")
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-voxtral"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise AudioTooLargeError(f"audio at {url} exceeds the {policy.max_bytes} byte limit")
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise InvalidRequestError(f"fetching {url} failed: HTTP {e.code}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise InvalidRequestError(f"fetching {url} failed: {getattr(e, 'reason', e)}") from e
    if len(data) > policy.max_bytes:
        raise AudioTooLargeError(f"audio at {url} exceeds the {policy.max_bytes} byte limit")
    return data


def read_audio_url(url: str, policy: Optional[SourcePolicy] = None) -> bytes:
    """The bytes an ``audio_url`` points to, as the policy allows."""
    policy = policy or SourcePolicy()
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError("audio_url.url must be a non-empty string")
    url = url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, policy.max_bytes)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_remote(url, policy)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequestError("file:// URLs must name a local path")
        return _read_local(urllib.parse.unquote(parsed.path), policy)
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise InvalidRequestError(f"unsupported audio_url scheme {scheme!r}")
    return _read_local(url, policy)
