"""Request validation shared by the Python API, the Runner and the server.

Each check returns the value in its canonical type or raises ``InvalidRequestError`` (for
audio, ``AudioError``) with a message naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .exceptions import AudioError, InvalidRequestError

MAX_DELAY_MS = 2400
SEED_RANGE = (-(2**63), 2**64 - 1)  # a 64-bit integer, signed or not, as OpenAI documents


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def check_temperature(temperature: Any, maximum: Optional[float] = None) -> float:
    """A finite number >= 0 (and <= ``maximum`` when given); 0 means greedy decoding."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature!r}", "temperature")
    if maximum is not None and temperature > maximum:
        raise InvalidRequestError(f"temperature must be at most {maximum:g}, got {temperature!r}", "temperature")
    return float(temperature)


def check_max_tokens(max_tokens: Any) -> Optional[int]:
    """None (no cap) or a positive integer."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1
    ):
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    return None if max_tokens is None else int(max_tokens)


def check_seed(seed: Any) -> Optional[int]:
    """None or a 64-bit integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
        SEED_RANGE[0] <= seed <= SEED_RANGE[1]
    ):
        raise InvalidRequestError(f"seed must be a 64-bit integer, got {seed!r}", "seed")
    return int(seed)


def check_probability(value: Any, name: str, default: float) -> float:
    """None (the default) or a number in [0, 1]."""
    if value is None:
        return default
    if not _is_number(value) or not (0.0 <= value <= 1.0):
        raise InvalidRequestError(f"{name} must be a number between 0 and 1, got {value!r}", name)
    return float(value)


def check_top_k(top_k: Any) -> int:
    """None or 0 (no cap) or a positive integer."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InvalidRequestError(f"top_k must be a non-negative integer, got {top_k!r}", "top_k")
    return int(top_k)


def check_delay(delay_ms: Any, token_ms: float, default: int) -> int:
    """A delay in ms: a multiple of ``token_ms`` in [token_ms, MAX_DELAY_MS]; None: ``default``."""
    if delay_ms is None:
        return default
    if (
        not _is_number(delay_ms)
        or not math.isfinite(delay_ms)
        or delay_ms < token_ms
        or delay_ms > MAX_DELAY_MS
        or float(delay_ms) % token_ms != 0
    ):
        raise InvalidRequestError(
            f"delay_ms must be a multiple of {token_ms:g} ms between {token_ms:g} and "
            f"{MAX_DELAY_MS} ms, got {delay_ms!r}", "delay_ms"
        )
    return int(delay_ms)


def check_samples(samples: Any) -> np.ndarray:
    """Audio samples as float32 mono, all finite."""
    chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
    if not np.isfinite(chunk).all():
        raise AudioError(f"the audio contains {int((~np.isfinite(chunk)).sum())} NaN or infinite samples")
    return chunk


def check_n(n: Any) -> None:
    """One choice per request."""
    if n not in (None, 1):
        raise InvalidRequestError(f"only one choice per request is supported, got n={n!r}", "n")
