"""Load a Voxtral Realtime checkpoint (local folder or Hugging Face repo) into MLX."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .cpu import cpu_kernels_wanted, use_cpu_kernels
from .exceptions import CheckpointError
from .model import Model
from .quantize import (
    QuantizeArg,
    check_stored_config,
    class_predicate,
    describe,
    quantization_config,
)
from .tokenizer import Tokenizer

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
_MATMUL_LAYERS = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
_REPO_FILES = ["params.json", "tekken.json", "*.safetensors", "*.safetensors.index.json", "README.md"]


def resolve_path(path_or_repo: Union[str, os.PathLike]) -> Path:
    """A local folder as is, else a Hugging Face repo id fetched (cache, offline mode honoured)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint folder")
        return path
    name = str(path_or_repo)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint folder not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_REPO_FILES))
    except Exception as e:
        raise CheckpointError(
            f"{name!r} is neither a local folder nor a downloadable Hugging Face repo: {e}"
        ) from e


def load_args(path: Path) -> ModelArgs:
    params_file = path / "params.json"
    if not params_file.exists():
        raise CheckpointError(
            f"{path} has no params.json: not a Voxtral Realtime checkpoint "
            "(expected params.json, consolidated.safetensors, tekken.json)"
        )
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{params_file} is not valid JSON: {e}") from e
    try:
        return ModelArgs.from_dict(params)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{params_file}: {e}") from e


def load_weights(path: Path) -> dict[str, mx.array]:
    """Lazily open every safetensors file of the checkpoint (nothing is read yet)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}") from e
    return weights


def _check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Fail loudly, naming tensors, if the checkpoint and the model do not match one to one."""
    expected = dict(tree_flatten(model.parameters()))
    unused = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    shapes = sorted(
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    )
    problems = []
    if unused:
        problems.append(f"{len(unused)} unused checkpoint tensors: {', '.join(unused[:20])}")
    if missing:
        problems.append(f"{len(missing)} parameters not in the checkpoint: {', '.join(missing[:20])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:20])}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(problems))


def _materialize(
    model: nn.Module,
    weights: dict[str, mx.array],
    dtype: Optional[mx.Dtype],
    float_dtype: Optional[mx.Dtype] = None,
    predicate: Optional[Callable[[str, nn.Module], Union[bool, dict]]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Load weights group by group, evaluating each before the next so the peak stays low.

    A group is one encoder/decoder layer, the embedding, the adapter's projections, ...
    ``dtype`` casts the matmul weights (Linear/Embedding weights and quantization scales and
    biases; None keeps the stored dtype); ``float_dtype``, if set, is the dtype of every
    other parameter (float32 on CPU, so that activations are float32). With ``predicate``
    (in-situ quantization) the layers it selects are quantized right after their group is
    loaded, so float and quantized copies of the whole model never coexist: the peak is
    about the final size plus one group.
    """
    # Paths of the matmul layers and of those to quantize. No reference to the float
    # modules may outlive this block: it would keep every float weight alive until the end.
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    matmuls = {path for path, m in leaves if isinstance(m, _MATMUL_LAYERS)}
    quantized = {path for path, m in leaves if predicate is not None and predicate(path, m)}
    del leaves

    def cast(name: str, w: mx.array) -> mx.array:
        module, _, leaf = name.rpartition(".")
        matmul = leaf in ("weight", "scales", "biases") and (module in matmuls or module in quantized)
        target = dtype if matmul or float_dtype is None else float_dtype
        if target is None or not mx.issubdtype(w.dtype, mx.floating):
            return w
        return w.astype(target)

    groups: dict[str, list[str]] = {}
    for name in weights:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
        groups.setdefault(key, []).append(name)
    for done, (key, names) in enumerate(groups.items(), start=1):
        chunk = [(name, cast(name, weights.pop(name))) for name in names]
        model.load_weights(chunk, strict=False)
        del chunk  # the model holds the group's tensors; quantizing drops the float ones
        pending = {path for path in quantized if path.startswith(key + ".") or path == key}
        if pending:
            nn.quantize(model, class_predicate=lambda p, m: p in pending and predicate(p, m))
        mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(key + ".")])
        if progress is not None:
            progress(done, len(groups))


def load(
    path_or_repo: Union[str, os.PathLike] = DEFAULT_MODEL,
    dtype: Optional[mx.Dtype] = None,
    quantize: QuantizeArg = None,
    group_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Model:
    """Load a Voxtral Realtime model and its tokenizer (``model.tokenizer``).

    Args:
        path_or_repo: a folder with ``params.json``, ``*.safetensors`` and ``tekken.json``
            (Mistral's native checkpoint, or one written by ``mlx_voxtral.convert``, quantized
            or not), or a Hugging Face repo id (downloaded and cached).
        dtype: dtype of the floating weights (and of quantization scales); ``None`` keeps the
            checkpoint's for the matmul weights and, on CPU, makes every other parameter
            float32 so that activations are float32 (MLX's half-precision CPU arithmetic is
            slow and inexact; the CPU matmuls of ``mlx_voxtral.cpu`` read half-precision and
            quantized weights directly).
        quantize: quantize while loading, layer by layer: 4 or 8 (decoder, encoder and
            embedding/LM head at that width, the adapter at 8 bits: the policy measured in
            ``mlx_voxtral.quantize``), or a dict such as ``{"decoder": 4, "encoder": 8,
            "embedding": 4, "adapter": 8}`` (parts not named stay full precision). A folder
            that is already quantized is loaded as stored and must not be given ``quantize``.
        group_size: weights per quantization group (32, 64 or 128) when quantizing;
            a layer whose input size it does not divide stays full precision.
        progress: called as ``progress(groups_done, groups_total)`` while weights load.

    Raises:
        CheckpointError: not a Voxtral Realtime checkpoint, weights that do not match, or
            ``quantize`` given for an already quantized folder.
        InvalidRequestError: unsupported ``quantize`` bits or ``group_size``.
    """
    config = quantization_config(quantize, group_size)
    path = resolve_path(path_or_repo)
    args = load_args(path)
    if not (path / "tekken.json").exists():
        raise CheckpointError(f"{path} has no tekken.json tokenizer")
    tokenizer = Tokenizer(path / "tekken.json")
    model = Model(args)
    in_situ = None
    if args.quantization is not None:
        stored = check_stored_config(args.quantization)
        if quantize is not None:
            raise CheckpointError(
                f"{path} is already quantized ({describe(stored)}); load it without "
                "quantize, or quantize the original (unquantized) checkpoint instead"
            )
        config = stored
        # quantized layers whose (lazy, never computed) contents the stored tensors replace
        nn.quantize(model, class_predicate=class_predicate(config))
    elif config is not None:
        in_situ = class_predicate(config)
    weights = Model.sanitize(load_weights(path))
    _check_weights(model, weights)
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    # On CPU, unless a dtype was asked for, everything but the matmul weights is float32 so
    # that activations are float32 (MLX's CPU half-precision arithmetic is slow and inexact).
    float_dtype = mx.float32 if on_cpu and dtype is None else None
    _materialize(model, weights, dtype, float_dtype, in_situ, progress)
    args.quantization = config
    wk = model.decoder.layers[0].attention.wk
    if float_dtype is not None and (isinstance(wk, nn.QuantizedLinear) or wk.weight.dtype != mx.float32):
        # float32 activations over half-precision or quantized weights: keys and values are
        # kept in bfloat16, half the memory and the reads of a float32 cache (the decoder's
        # full 8192-position window 0.87 GB, the encoder's 750 positions 0.2 GB per stream)
        model.decoder.cache_dtype = model.encoder.cache_dtype = mx.bfloat16
    if on_cpu and cpu_kernels_wanted():
        use_cpu_kernels(model)
    model.eval()
    model.tokenizer = tokenizer
    model.path = path
    return model
