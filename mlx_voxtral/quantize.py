"""Quantization policy: which layers become group-wise quantized, and which stay full precision.

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

Every width and mode MLX quantizes these layers at is accepted (``MODES``): ``affine``
(a scale and a bias per group, in the checkpoint's dtype) at 2, 3, 4, 5, 6 or 8 bits with
group size 32, 64 or 128, and the floating-point modes with their fixed layouts (an 8-bit
scale per group, no bias): ``mxfp4`` (4 bits, group 32), ``mxfp8`` (8 bits, group 32) and
``nvfp4`` (4 bits, group 16). MLX's 1-bit affine is left out: on these weights its error is
larger than the weights themselves. A setting has one mode for all its parts; the adapter
policy keeps the adapter at 8 bits where the mode has 8 bits, and in full precision where it
has not (``mxfp4``, ``nvfp4``).

Scales and biases of affine quantized layers keep the checkpoint's dtype. Which dtype the other
parameters (norms, conv stem, ada MLPs, biases) and so the activations have is the backend's
policy: the plain MLX modules keep the checkpoint's (bf16, as on a Mac), the CPU backend makes
them float32 (``mlx_voxtral.cpu``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .exceptions import CheckpointError, InvalidRequestError

PARTS = ("decoder", "encoder", "embedding", "adapter")  # largest first
MODE = "affine"  # the default mode
# mode -> (bits, group sizes, default group size), as MLX's ``mx.quantize`` documents them
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "mxfp8": ((8,), (32,), 32),
    "nvfp4": ((4,), (16,), 16),
}
BITS = MODES[MODE][0]
GROUP_SIZES = MODES[MODE][1]

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


def default_parts(bits: int, mode: str = MODE) -> dict[str, Optional[int]]:
    """The measured policy for ``quantize=bits``: every part at ``bits``, the adapter at >= 8
    bits (full precision in a mode without 8 bits)."""
    adapter = max(bits, 8)
    return {"decoder": bits, "encoder": bits, "embedding": bits,
            "adapter": adapter if adapter in MODES[mode][0] else None}


def _words(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidRequestError(f"quantization mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _check_bits(bits: Any, mode: str = MODE, what: str = "") -> int:
    allowed = MODES[mode][0]
    if isinstance(bits, bool) or bits not in allowed:
        raise InvalidRequestError(f"quantization bits{what} must be {_words(allowed)}"
                                  f"{'' if mode == MODE else f' in mode {mode}'}, got {bits!r}")
    return int(bits)


def _check_group_size(group_size: Any, mode: str = MODE) -> int:
    allowed = MODES[mode][1]
    if isinstance(group_size, bool) or group_size not in allowed:
        raise InvalidRequestError(f"group_size must be {_words(allowed)}"
                                  f"{'' if mode == MODE else f' in mode {mode}'}, got {group_size!r}")
    return int(group_size)


def quantization_config(
    quantize: QuantizeArg, group_size: Optional[int] = None, mode: str = MODE
) -> Optional[dict[str, Any]]:
    """Validate a ``quantize`` setting and return the ``quantization`` block it stands for.

    Args:
        quantize: ``None`` (no quantization), bits (``default_parts``: 2, 3, 4, 5, 6 or 8 in
            the ``affine`` mode, 4 in ``mxfp4``/``nvfp4``, 8 in ``mxfp8``), or a dict from part
            name (``decoder``, ``encoder``, ``embedding``, ``adapter``) to such bits or None;
            parts not named stay full precision.
        group_size: weights sharing one scale (and bias): 32, 64 or 128 in the ``affine``
            mode, 32 in ``mxfp4``/``mxfp8``, 16 in ``nvfp4``; None: the mode's default (64
            for ``affine``).
        mode: ``"affine"``, ``"mxfp4"``, ``"mxfp8"`` or ``"nvfp4"`` (``MODES``).

    Returns:
        ``{"group_size", "bits", "mode", "parts": {part: bits or None}}`` as stored in a
        converted checkpoint's ``params.json``, or None. ``bits`` is the headline figure:
        that of the largest quantized part (the decoder's, unless it is full precision).

    Raises:
        InvalidRequestError: unsupported mode, bits, group size (for the mode) or part name.
    """
    mode = _check_mode(mode)
    if quantize is None:
        return None
    group_size = _check_group_size(MODES[mode][2] if group_size is None else group_size, mode)
    if isinstance(quantize, dict):
        unknown = sorted(set(quantize) - set(PARTS))
        if unknown:
            raise InvalidRequestError(
                f"unknown quantization part(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(PARTS)}"
            )
        parts = {
            p: None if quantize.get(p) is None else _check_bits(quantize[p], mode, f" for the {p}")
            for p in PARTS
        }
        if all(b is None for b in parts.values()):
            return None
    else:
        parts = default_parts(_check_bits(quantize, mode), mode)
    return {
        "group_size": group_size,
        "bits": next(b for b in parts.values() if b is not None),
        "mode": mode,
        "parts": parts,
    }


def check_stored_config(config: Any) -> dict[str, Any]:
    """Validate the ``quantization`` block read from a converted checkpoint."""
    try:
        parts = config["parts"]
        if not isinstance(parts, dict):
            raise ValueError
        checked = quantization_config(parts, config["group_size"], config.get("mode", MODE))
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
    group_size, mode = config["group_size"], config.get("mode", MODE)
    parts = config["parts"]

    def predicate(path: str, module: nn.Module) -> Union[bool, dict]:
        bits = parts.get(part_of(path))
        if bits is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if module.weight.shape[-1] % group_size:
            return False
        return {"group_size": group_size, "bits": bits, "mode": mode}

    return predicate


# MLX 0.32.4's CPU quantize in the fp modes holds ~70 bytes per weight at once (15 GB for the
# 131072 x 3072 embedding in mxfp4) and crashes on that embedding in nvfp4: in those modes a
# layer is quantized at most this many weights at a time, each block evaluated before the next
# (rows are independent: the arrays are the same). Affine quantizes whole layers, lazily with
# their group: blocks there left 0.4 GB more resident at 8 bits.
_QUANTIZE_BLOCK = 1 << 23


def quantized_layer(module: nn.Module, group_size: int, bits: int, mode: str = MODE) -> nn.Module:
    """``module.to_quantized(group_size, bits, mode)``; in an fp mode the weight is quantized
    a block of rows at a time, evaluated here. The arrays equal one ``mx.quantize`` of the
    whole weight."""
    layer = module.to_quantized(group_size=group_size, bits=bits, mode=mode)
    if mode == MODE:
        return layer
    w = module.weight
    rows = max(1, _QUANTIZE_BLOCK // w.shape[-1])
    blocks = []
    for i in range(0, w.shape[0], rows):
        blocks.append(mx.quantize(w[i : i + rows], group_size, bits, mode=mode))
        mx.eval(blocks[-1])
    # replacing the arrays drops to_quantized's own (lazy, never computed) quantize
    layer.weight, layer.scales, *biases = (mx.concatenate(parts) if len(parts) > 1 else parts[0]
                                           for parts in zip(*blocks))
    layer.biases = biases[0] if biases else None
    return layer


def every_layer(bits: int, group_size: int) -> Callable[[str, nn.Module], Union[bool, dict]]:
    """The ``class_predicate`` of one affine ``bits``/``group_size`` over every Linear/Embedding
    whose input size the group size divides, the adapter and the ada-norm MLPs included: the
    selection voxmlx (0.0.2, ``voxmlx.weights``) re-creates from its config's one
    ``{"group_size", "bits"}``, so the only one a voxmlx folder can hold."""

    def predicate(path: str, module: nn.Module) -> Union[bool, dict]:
        if not isinstance(module, (nn.Linear, nn.Embedding)) or module.weight.shape[-1] % group_size:
            return False
        return {"group_size": group_size, "bits": bits, "mode": MODE}

    return predicate


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each quantized layer of ``model`` by module path, with its ``to_quantized`` arguments."""
    return {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", MODE)}
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def unlike(model: nn.Module, predicate: Callable[[str, nn.Module], Union[bool, dict]]) -> list[str]:
    """The layers of ``model`` (quantized already, or not) that ``nn.quantize`` with
    ``predicate`` would not make as they are: ``path: 4-bit group 64, not full precision``."""
    out = []
    have = quantized_layers(model)
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        if path in have:  # ask the predicate about the float layer this one was made from
            q = have[path]
            size = m.weight.shape[-1] * 32 // q["bits"]
            probe = nn.Embedding(1, size) if isinstance(m, nn.QuantizedEmbedding) else nn.Linear(size, 1)
        else:
            q, probe = None, m
        want = predicate(path, probe) or None
        if want is not None:
            want = {"group_size": want["group_size"], "bits": want["bits"], "mode": want.get("mode", MODE)}
        if want != q:
            out.append(f"{path}: {_setting(q)}, not {_setting(want)}")
    return out


def _setting(q: Optional[dict[str, Any]]) -> str:
    if q is None:
        return "full precision"
    return f"{q['bits']}-bit{'' if q['mode'] == MODE else ' ' + q['mode']} group {q['group_size']}"


def stored_layers(
    model: nn.Module, weights: dict[str, Any], mode: str = MODE, spell: Callable[[str], str] = str
) -> dict[str, dict[str, Any]]:
    """The quantized layers of a checkpoint in another project's layout, by module path, with
    the ``to_quantized`` arguments their stored tensors say: a Linear/Embedding is quantized
    where its ``scales`` are stored, its group size is its input size over the scales' columns
    and its bits the packed words' columns times 32 over the input size. Messages name a layer
    as ``spell`` writes its path (as the checkpoint's files do).

    Raises:
        CheckpointError: a layer whose stored shapes are no setting ``mode`` has (``MODES``).
    """
    layers = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        size = module.weight.shape[-1]
        packed = weights.get(f"{path}.weight")
        group_size = size // scales.shape[-1] if scales.shape[-1] else 0
        bits = packed.shape[-1] * 32 // size if packed is not None else 0
        try:
            quantization_config({part_of(path) or "decoder": bits}, group_size, mode)
        except InvalidRequestError as e:
            raise CheckpointError(f"{spell(path)} is stored quantized in shapes no {mode} setting has: {e}") from None
        if mode == MODE and f"{path}.biases" not in weights:
            raise CheckpointError(f"{spell(path)} is stored affine-quantized without its biases")
        layers[path] = {"group_size": group_size, "bits": bits, "mode": mode}
    return layers


def summarize_layers(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization`` block standing for ``stored_layers``: each part at the largest
    width among its layers, the group size most of them have."""
    parts: dict[str, Optional[int]] = {p: None for p in PARTS}
    for path, q in layers.items():
        part = part_of(path) or "decoder"
        parts[part] = max(parts[part] or 0, q["bits"])
    sizes = [q["group_size"] for q in layers.values()]
    any_layer = next(iter(layers.values()), {"mode": MODE})
    return {
        "group_size": max(set(sizes), key=sizes.count) if sizes else MODES[MODE][2],
        "bits": next((b for b in parts.values() if b is not None), 0),
        "mode": any_layer["mode"],
        "parts": parts,
    }


def describe(config: Optional[dict[str, Any]]) -> str:
    """One line for people: ``4-bit, group size 64; decoder 4, encoder 4, ...`` (``4-bit
    mxfp4, ...`` in a mode other than affine)."""
    if config is None:
        return "not quantized"
    parts = ", ".join(
        f"{p} {'full precision' if b is None else b}" for p, b in config["parts"].items()
    )
    mode = config.get("mode", MODE)
    return f"{config['bits']}-bit{'' if mode == MODE else ' ' + mode}, group size {config['group_size']}; {parts}"
