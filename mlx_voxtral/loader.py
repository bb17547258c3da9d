"""Load a Voxtral Realtime checkpoint (local folder or Hugging Face repo) into MLX."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .exceptions import CheckpointError
from .model import Model
from .tokenizer import Tokenizer

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
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


def _materialize(model: nn.Module, weights: dict[str, mx.array], dtype: Optional[mx.Dtype]) -> None:
    """Load weights group by group, evaluating each before the next so the peak stays low."""
    groups: dict[str, list[str]] = {}
    for name in weights:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
        groups.setdefault(key, []).append(name)
    for names in groups.values():
        chunk = []
        for name in names:
            w = weights.pop(name)
            if dtype is not None and mx.issubdtype(w.dtype, mx.floating):
                w = w.astype(dtype)
            chunk.append((name, w))
        model.load_weights(chunk, strict=False)
        mx.eval([w for _, w in chunk])
        del chunk


def load(
    path_or_repo: Union[str, os.PathLike] = DEFAULT_MODEL,
    dtype: Optional[mx.Dtype] = None,
) -> Model:
    """Load a Voxtral Realtime model and its tokenizer (``model.tokenizer``).

    Args:
        path_or_repo: a folder with ``params.json``, ``consolidated.safetensors`` and
            ``tekken.json``, or a Hugging Face repo id (downloaded and cached).
        dtype: compute/storage dtype for floating weights; ``None`` keeps the checkpoint's.

    Raises:
        CheckpointError: not a Voxtral Realtime checkpoint, or weights that do not match.
    """
    path = resolve_path(path_or_repo)
    args = load_args(path)
    if not (path / "tekken.json").exists():
        raise CheckpointError(f"{path} has no tekken.json tokenizer")
    tokenizer = Tokenizer(path / "tekken.json")
    model = Model(args)
    weights = Model.sanitize(load_weights(path))
    _check_weights(model, weights)
    _materialize(model, weights, dtype)
    model.eval()
    model.tokenizer = tokenizer
    model.path = path
    return model
