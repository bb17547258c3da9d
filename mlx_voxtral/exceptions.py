"""Typed errors raised for bad input. All derive from ``VoxtralError`` (a ``ValueError``)."""

from typing import Optional


class VoxtralError(ValueError):
    """Base class of every error mlx_voxtral raises for bad input.

    ``param`` names the request field at fault, when one is (``"temperature"``,
    ``"messages"``, ...); the server reports it as OpenAI's ``error.param``.
    """

    def __init__(self, message: str = "", param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class AudioError(VoxtralError):
    """Audio that cannot be decoded or used: missing, corrupt, empty, non-finite."""


class UnsupportedAudioFormatError(AudioError):
    """A container or codec that no available decoder can read, or a sample rate outside
    ``audio.MIN_SAMPLE_RATE`` .. ``audio.MAX_SAMPLE_RATE``."""


class AudioTooLongError(AudioError):
    """Audio longer than the limit the caller set (``max_seconds``)."""


class CheckpointError(VoxtralError):
    """A folder or repo that is not a usable Voxtral Realtime checkpoint."""


class InvalidRequestError(VoxtralError):
    """A request parameter out of range (delay, temperature, max_tokens, ...)."""
