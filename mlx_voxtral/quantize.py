"""Quantization policy: which layers become group-wise 4/8-bit, and which stay full precision.

The model has four quantizable *parts*:

* ``decoder``   - the decoder layers' attention and SwiGLU projections (3.0 B parameters)
* ``encoder``   - the audio encoder layers' attention and SwiGLU projections (0.97 B)
* ``embedding`` - the token embedding, which is also the tied LM head (0.40 B)
* ``adapter``   - the two adapter projections (25 M)

Always full precision: the conv stem (``encoder.conv_layers``), every RMSNorm, the ada-norm
MLPs (``decoder.layers.*.ada_down/ada_up``: 0.2 M parameters per layer that scale every FFN
input) and the Linear biases. A layer whose input dimension is not a multiple of the group
size is left in full precision too (the tiny test model has such layers).

So ``quantize=8`` is every part at 8 bits and ``quantize=4`` is decoder, embedding and
encoder at 4 bits with the adapter at 8 (``default_parts``): the adapter is 0.6 % of the
parameters but its quantization error is as large as the whole decoder's (the measurements
behind the policy are in BENCHMARKS.md). Mixed settings are a dict, e.g.
``{"decoder": 4, "embedding": 4, "encoder": 8, "adapter": 8}``. Storage per weight at group
size 64 with bf16 scales and biases: 0.5625 bytes (4-bit), 1.0625 bytes (8-bit), 2 (bf16).

Scales and biases of quantized layers keep the checkpoint's dtype. Which dtype the other
parameters (norms, conv stem, ada MLPs, biases) and so the activations have is the backend's
policy: the plain MLX modules keep the checkpoint's (bf16, as on a Mac), the CPU backend makes
them float32 (``mlx_voxtral.cpu``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import mlx.nn as nn

from .exceptions import CheckpointError, InvalidRequestError

PARTS = ("decoder", "encoder", "embedding", "adapter")  # largest first
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"

QuantizeArg = Union[None, int, dict[str, Optional[int]]]


def part_of(path: str) -> Optional[str]:
    """The quantizable part a module path belongs to, or None for full-precision modules."""
    if path in ("decoder.tok_embeddings", "decoder.output"):
        return "embedding"
    if path in ("adapter.w_in", "adapter.w_out"):
        return "adapter"
    top, _, rest = path.partition(".")
    if top in ("encoder", "decoder") and rest.startswith("layers."):
        sub = rest.split(".")
        if len(sub) == 4 and sub[2] in ("attention", "feed_forward"):
            return top
    return None


def default_parts(bits: int) -> dict[str, Optional[int]]:
    """The measured policy for ``quantize=bits``: every part at ``bits``, the adapter at >= 8."""
    return {"decoder": bits, "encoder": bits, "embedding": bits, "adapter": max(bits, 8)}


def _check_bits(bits: Any, what: str = "") -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise InvalidRequestError(f"quantization bits{what} must be 4 or 8, got {bits!r}")
    return int(bits)


def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise InvalidRequestError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    return int(group_size)


def quantization_config(quantize: QuantizeArg, group_size: int = 64) -> Optional[dict[str, Any]]:
    """Validate a ``quantize`` setting and return the ``quantization`` block it stands for.

    Args:
        quantize: ``None`` (no quantization), 4 or 8 (``default_parts``), or a dict
            from part name (``decoder``, ``encoder``, ``embedding``, ``adapter``) to 4, 8 or
            None; parts not named stay full precision.
        group_size: weights sharing one scale and bias: 32, 64 or 128.

    Returns:
        ``{"group_size", "bits", "mode", "parts": {part: bits or None}}`` as stored in a
        converted checkpoint's ``params.json``, or None. ``bits`` is the headline figure:
        that of the largest quantized part (the decoder's, unless it is full precision).

    Raises:
        InvalidRequestError: unsupported bits, group size or part name.
    """
    if quantize is None:
        return None
    group_size = _check_group_size(group_size)
    if isinstance(quantize, dict):
        unknown = sorted(set(quantize) - set(PARTS))
        if unknown:
            raise InvalidRequestError(
                f"unknown quantization part(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(PARTS)}"
            )
        parts = {
            p: None if quantize.get(p) is None else _check_bits(quantize[p], f" for the {p}")
            for p in PARTS
        }
        if all(b is None for b in parts.values()):
            return None
    else:
        parts = default_parts(_check_bits(quantize))
    return {
        "group_size": group_size,
        "bits": next(b for b in parts.values() if b is not None),
        "mode": MODE,
        "parts": parts,
    }


def check_stored_config(config: Any) -> dict[str, Any]:
    """Validate the ``quantization`` block read from a converted checkpoint."""
    try:
        parts = config["parts"]
        if config.get("mode", MODE) != MODE or not isinstance(parts, dict):
            raise ValueError
        checked = quantization_config(parts, config["group_size"])
    except (InvalidRequestError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = f": {e}" if isinstance(e, InvalidRequestError) else ""
        raise CheckpointError(
            f"params.json has an unreadable quantization block {config!r}{detail}"
        ) from e
    if checked is None:
        raise CheckpointError(
            f"params.json has a quantization block with no quantized part: {config!r}"
        )
    return checked


def class_predicate(config: dict[str, Any]) -> Callable[[str, nn.Module], Union[bool, dict]]:
    """The ``class_predicate`` for ``mlx.nn.quantize`` that applies a quantization block.

    It returns the ``to_quantized`` arguments for a Linear/Embedding of a quantized part whose
    input dimension is a multiple of the group size, and False for everything else.
    """
    group_size = config["group_size"]
    parts = config["parts"]

    def predicate(path: str, module: nn.Module) -> Union[bool, dict]:
        bits = parts.get(part_of(path))
        if bits is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if module.weight.shape[-1] % group_size:
            return False
        return {"group_size": group_size, "bits": bits, "mode": MODE}

    return predicate


def describe(config: Optional[dict[str, Any]]) -> str:
    """One line for people: ``4-bit, group size 64; decoder 4, encoder 4, ...``."""
    if config is None:
        return "not quantized"
    parts = ", ".join(
        f"{p} {'full precision' if b is None else b}" for p, b in config["parts"].items()
    )
    return f"{config['bits']}-bit, group size {config['group_size']}; {parts}"
