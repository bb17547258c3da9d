"""Typed errors raised for bad input. All derive from ``VoxtralError`` (a ``ValueError``)."""


class VoxtralError(ValueError):
    """Base class of every error mlx_voxtral raises for bad input."""


class AudioError(VoxtralError):
    """Audio that cannot be decoded or used: missing, corrupt, empty, non-finite."""


class UnsupportedAudioFormatError(AudioError):
    """A container or codec that no available decoder can read."""


class CheckpointError(VoxtralError):
    """A folder or repo that is not a usable Voxtral Realtime checkpoint."""


class InvalidRequestError(VoxtralError):
    """A request parameter out of range (delay, temperature, max_tokens, ...)."""
