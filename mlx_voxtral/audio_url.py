"""Resolve the audio of an OpenAI-style message part to bytes.

``audio_url`` parts may carry a ``data:audio/...;base64,`` URL, a local path or ``file://``
URL, or an ``http(s)://`` URL; ``input_audio`` parts carry ``{"data": base64, "format"}``.
What is allowed is a ``SourcePolicy``: the Python API allows everything, the server only
what its flags enable (local files under one folder; remote URLs on allowed domains, public
addresses only, with a size cap and a deadline for the whole fetch).

Remote fetches are made safe against server-side request forgery: every hop (redirects
included, at most ``max_redirects``) must be http(s) on an allowed domain, its host is
resolved once and every address it resolves to must be public (loopback, private,
link-local, multicast and reserved addresses are refused, however the URL spells them),
and the connection goes to the address that was checked, so a second DNS answer cannot
redirect it. Error messages say what went wrong in general terms only (no status codes,
addresses or socket errors that would make the server a port scanner).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .exceptions import InvalidRequestError

MAX_AUDIO_BYTES = 100 * 1024 * 1024
MAX_URL_LENGTH = 4096  # for paths and remote URLs; data URLs are bounded by max_bytes

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ForbiddenSourceError(InvalidRequestError):
    """An audio location this caller may not read (local file or remote URL not allowed)."""


class AudioTooLargeError(InvalidRequestError):
    """Audio larger than the policy's ``max_bytes``."""


class FetchError(InvalidRequestError):
    """A remote audio URL that could not be fetched (unreachable, not HTTP, an error status,
    too many redirects, past the deadline).

    The message says why (the remote status, the socket error) for the Python caller;
    ``public`` says it in terms a server may show its client.
    """

    def __init__(self, message: str, public: Optional[str] = None):
        super().__init__(message)
        self.public = public or "the audio URL could not be fetched"


@dataclass
class SourcePolicy:
    """Which audio locations may be read.

    ``local_root``: ``None`` forbids local paths; a folder allows files inside it only;
    ``"*"`` allows any readable file (the Python API's default). ``allow_remote``: http(s)
    URLs may be fetched, within ``max_bytes`` and ``timeout`` seconds for the whole fetch.
    ``allowed_domains``: when non-empty, remote hosts must be one of these domains or under
    one. ``allow_private_addresses``: whether a remote host may resolve to a loopback,
    private or link-local address (the Python API's default; the server refuses them unless
    told otherwise).
    """

    local_root: Optional[str] = "*"
    allow_remote: bool = True
    max_bytes: int = MAX_AUDIO_BYTES
    timeout: float = 30.0
    allowed_domains: tuple = ()
    allow_private_addresses: bool = True
    max_redirects: int = 3


def _b64decode(data: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"{what} is not valid base64") from e


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
    data = _b64decode(match.group("data"), "data URL payload")
    if not data:
        raise InvalidRequestError("the data URL carries no audio")
    return data


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
            raise ForbiddenSourceError("the audio_url path is outside the folder this server may read")
    if not real.is_file():
        raise InvalidRequestError(f"audio file not found: {path}")
    if real.stat().st_size > policy.max_bytes:
        raise AudioTooLargeError(f"audio exceeds the {policy.max_bytes} byte limit")
    return real.read_bytes()


# remote ---------------------------------------------------------------------------------
def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def _domain_allowed(host: str, domains) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address resolved beforehand, verifying the certificate for ``hostname``."""

    def __init__(self, address: str, port: int, hostname: str, timeout: float):
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._hostname = hostname

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._hostname)


def _resolve(host: str, port: int, policy: SourcePolicy) -> str:
    """One address of ``host`` that the policy lets us connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise FetchError(f"the audio URL's host {host!r} could not be resolved",
                         "the audio URL's host could not be resolved") from e
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise FetchError(f"the audio URL's host {host!r} could not be resolved",
                         "the audio URL's host could not be resolved")
    if not policy.allow_private_addresses and not all(_is_public(a) for a in addresses):
        raise ForbiddenSourceError("the audio URL points to a private, loopback or link-local address")
    return addresses[0]


def _fetch_once(url: str, policy: SourcePolicy, deadline: float):
    """(redirect location or None, body) for one hop."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ForbiddenSourceError("audio URLs must be http(s) URLs with a host, on every redirect")
    host = parts.hostname
    if policy.allowed_domains and not _domain_allowed(host, policy.allowed_domains):
        raise ForbiddenSourceError("the audio URL's host is not on this server's list of allowed domains")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise InvalidRequestError("the audio URL has an invalid port") from e
    address = _resolve(host, port, policy)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            message = f"fetching the audio URL took longer than {policy.timeout:g} s"
            raise FetchError(message, message)
        return left

    if parts.scheme.lower() == "https":
        conn = _PinnedHTTPSConnection(address, port, host, remaining())
    else:
        conn = http.client.HTTPConnection(address, port, timeout=remaining())
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and not host.startswith("["):  # an IPv6 literal
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    watchdog = None
    try:
        conn.connect()
        sock = conn.sock
        # the deadline covers the whole hop: a server trickling its headers or body is cut off
        watchdog = threading.Timer(remaining(), _shut, (sock,))
        watchdog.daemon = True
        watchdog.start()
        conn.request("GET", target, headers={"Host": host_header, "User-Agent": "mlx-voxtral",
                                             "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            if not location:
                raise FetchError("the audio URL redirected without a Location")
            return urllib.parse.urljoin(url, location), b""
        if response.status != 200:
            raise FetchError(f"fetching the audio URL failed: HTTP {response.status}",
                             "the audio URL could not be fetched (the remote server answered with an error)")
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise AudioTooLargeError(f"the remote audio exceeds the {policy.max_bytes} byte limit")
        chunks, size = [], 0
        while True:
            sock.settimeout(remaining())
            chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise AudioTooLargeError(f"the remote audio exceeds the {policy.max_bytes} byte limit")
            chunks.append(chunk)
            remaining()
        remaining()  # the watchdog may have cut the body short
        if length is not None and length.strip().isdigit() and size != int(length):
            raise FetchError(f"the audio URL's body ended after {size} of {int(length)} bytes")
        return None, b"".join(chunks)
    except (InvalidRequestError, FetchError):
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, timeout, not HTTP
        raise FetchError(f"fetching the audio URL failed: {e!r}") from e
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_remote(url: str, policy: SourcePolicy) -> bytes:
    if not policy.allow_remote:
        raise ForbiddenSourceError("remote audio URLs are not allowed (server flag --allow-remote-urls)")
    deadline = time.monotonic() + policy.timeout
    for _ in range(policy.max_redirects + 1):
        location, data = _fetch_once(url, policy, deadline)
        if location is None:
            if not data:
                raise FetchError("the audio URL returned no data", "the audio URL returned no data")
            return data
        url = location
    raise FetchError("the audio URL redirected too many times", "the audio URL redirected too many times")


def read_audio_url(url: str, policy: Optional[SourcePolicy] = None) -> bytes:
    """The bytes an ``audio_url`` points to, as the policy allows."""
    policy = policy or SourcePolicy()
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError("audio_url.url must be a non-empty string")
    url = url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, policy.max_bytes)
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequestError(f"audio_url is longer than {MAX_URL_LENGTH} characters")
    if _CONTROL.search(url):
        raise InvalidRequestError("audio_url contains control characters")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_remote(url, policy)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequestError("file:// URLs must name a local path")
        path = urllib.parse.unquote(parsed.path)
        if _CONTROL.search(path):
            raise InvalidRequestError("audio_url contains control characters")
        return _read_local(path, policy)
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise InvalidRequestError(f"unsupported audio_url scheme {scheme[:16]!r}")
    return _read_local(url, policy)
