"""Convert a Voxtral Realtime checkpoint to an MLX-format folder, optionally quantized.

    python -m mlx_voxtral.convert --model mistralai/Voxtral-Mini-4B-Realtime-2602 \\
        --out voxtral-4bit --bits 4 --group-size 64 [--mode affine] [--encoder-bits 8] [--upload-repo ME/REPO]

Without ``--bits`` the weights keep full precision (``--dtype`` can change it). ``--bits`` is
2, 3, 4, 5, 6 or 8 in the default ``--mode affine``, 4 in ``mxfp4`` and ``nvfp4``, 8 in
``mxfp8`` (``mlx_voxtral.quantize.MODES``); per-part flags (``--decoder-bits``,
``--encoder-bits``, ``--embedding-bits``, ``--adapter-bits``: such bits or none) override the
policy of ``mlx_voxtral.quantize``.

The output folder holds:

* ``params.json``: the source's model parameters (Mistral's schema, so one parser reads both)
  plus, when quantized, a ``quantization`` block in the mlx-lm spirit:
  ``{"group_size": 64, "bits": 4, "mode": "affine", "parts": {"decoder": 4, ...}}``;
* ``model-00001-of-0000N.safetensors`` shards (at most 5 GB each) with the weights already
  mapped to this package's module names (quantized layers as ``weight``/``scales``/``biases``)
  and ``model.safetensors.index.json``;
* ``tekken.json`` (copied) and a ``README.md`` model card.

``mlx_voxtral.load(out)`` opens it directly: the model is quantized as recorded *before*
its weights are read, so nothing is quantized twice.

``--layout mlx-audio`` writes the folder mlx-audio 0.6.2 loads instead
(``mlx_audio.stt.utils.load_model(out)``; ``write_mlx_audio``), which ``load`` opens too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .exceptions import CheckpointError, InvalidRequestError, VoxtralError
from .loader import DEFAULT_MODEL, load, load_args, load_weights, resolve_path
from .model import LAYOUTS, Model, _rename
from .quantize import MODES, PARTS, QuantizeArg, check_stored_config, describe, quantization_config

MAX_SHARD_BYTES = 5 << 30
LAYOUTS_WRITTEN = ("mlx-voxtral", "mlx-audio")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _stored_dtype(path: Path) -> mx.Dtype:
    """The dtype most floating tensors of a checkpoint have (nothing is read but headers)."""
    weights = load_weights(path).values()
    dtypes = [w.dtype for w in weights if mx.issubdtype(w.dtype, mx.floating)]
    return max(set(dtypes), key=dtypes.count)


def make_shards(
    weights: dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES
) -> list[dict[str, mx.array]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if shards[-1] and size + w.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def save_weights(
    out: Path,
    weights: dict[str, mx.array],
    max_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool = True,
) -> list[str]:
    """Write sharded safetensors and ``model.safetensors.index.json``; return the shard names."""
    shards = make_shards(weights, max_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(w.nbytes for w in weights.values())
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not show_progress)
    with bar:
        for name, shard in zip(names, shards):
            mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
            weight_map.update({k: name for k in shard})
            bar.update(sum(w.nbytes for w in shard.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def model_card(base_model: str, name: str, config: Optional[dict], dtype: mx.Dtype) -> str:
    """README.md for a converted folder: Hub metadata and how to use it."""
    from . import __version__

    tags = ["mlx", "voxtral", "speech-recognition", "streaming"]
    if config is None:
        weights = f"Weights in {str(dtype).split('.')[-1]}, not quantized."
    else:
        tags.append(f"{config['bits']}-bit")
        weights = (
            f"Quantized with group-wise {config.get('mode', 'affine')} quantization: {describe(config)}. The conv stem, "
            "norms and ada-norm MLPs stay in full precision."
        )
    front = "\n".join(
        ["---", "library_name: mlx", "license: apache-2.0", f"base_model: {base_model}",
         "pipeline_tag: automatic-speech-recognition", "tags:"]
        + [f"- {t}" for t in tags]
        + ["---"]
    )
    return f"""{front}

# {name}

[{base_model}](https://huggingface.co/{base_model}) (Voxtral Mini 4B Realtime, real-time speech
recognition) converted to MLX format with mlx_voxtral {__version__}. {weights}

## Use

```bash
pip install mlx-voxtral
```

```python
import mlx_voxtral

model = mlx_voxtral.load("{name}")
print(mlx_voxtral.transcribe(model, "speech.wav").text)
```
"""


# Sizes mlx-audio 0.6.2 fixes in its code instead of reading its config: the adapter's output
# (voxtral_realtime/encoder.py, decoder_dim = 3072) and the conv stem's input (128 mel bins).
MLX_AUDIO_FIXED = {"decoder dim": 3072, "num_mel_bins": 128}
_MLX_AUDIO_DECODER = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
                      "norm_eps", "rope_theta", "sliding_window", "model_max_length", "tied_embeddings",
                      "ada_rms_norm_t_cond", "ada_rms_norm_t_cond_dim")


def check_mlx_audio(args) -> None:
    """Raise ``InvalidRequestError`` if mlx-audio could not build a model of ``args``' sizes."""
    sizes = {"decoder dim": args.dim, "num_mel_bins": args.encoder.audio_encoding_args.num_mel_bins}
    wrong = [f"{k} {sizes[k]} (mlx-audio's is always {v})" for k, v in MLX_AUDIO_FIXED.items() if sizes[k] != v]
    if wrong:
        raise InvalidRequestError(f"mlx-audio 0.6.2 cannot load this model: {', '.join(wrong)}")


def mlx_audio_config(model, delay_ms: int) -> dict:
    """mlx-audio's ``config.json`` for a loaded model: ``decoder`` and ``encoder_args``
    sections, the default delay, and mlx-lm's ``quantization`` block (also as
    ``quantization_config``, as mlx-audio writes it): the headline bits, group size and mode,
    and an entry under mlx-audio's module path for each quantized layer stored otherwise
    (mlx-audio quantizes a layer with the headline setting where its ``scales`` are stored)."""
    import dataclasses

    args = model.args
    config = {
        "model_type": "voxtral_realtime",
        "decoder": {k: getattr(args, k) for k in _MLX_AUDIO_DECODER},
        "encoder_args": {**dataclasses.asdict(args.encoder), "downsample_factor": args.downsample_factor},
        "transcription_delay_ms": delay_ms,
    }
    if args.quantization is not None:
        q = args.quantization
        block = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            layer = {"group_size": getattr(m, "group_size", None), "bits": getattr(m, "bits", None),
                     "mode": getattr(m, "mode", None)}
            if layer["bits"] is not None and layer != {k: block[k] for k in layer}:
                block[_rename(path + ".", LAYOUTS["mlx-audio"], reverse=True)[:-1]] = layer
        config["quantization"] = config["quantization_config"] = block
    return config


def write_mlx_audio(out: Path, model, show_progress: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``model`` into ``out`` as mlx-audio 0.6.2 loads it: ``config.json``
    (``mlx_audio_config``) and its weights under mlx-audio's names (``LAYOUTS["mlx-audio"]``)."""
    weights = Model.to_layout(dict(tree_flatten(model.parameters())), "mlx-audio")
    save_weights(out, weights, max_shard_bytes, show_progress)
    config = mlx_audio_config(model, model.tokenizer.default_delay_ms)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def upload(folder: Union[str, os.PathLike], repo: str) -> None:
    """Create ``repo`` on the Hugging Face Hub if needed and upload ``folder`` to it."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:
        raise VoxtralError(f"upload to {repo!r} failed: {e}") from e


def convert(
    src: Union[str, os.PathLike],
    dst: Union[str, os.PathLike],
    bits: QuantizeArg = None,
    group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool = True,
    mode: str = "affine",
    layout: str = "mlx-voxtral",
) -> Path:
    """Write ``src`` as an MLX-format folder ``dst``, quantized if ``bits`` is given.

    Args:
        src: a native checkpoint folder, a Hugging Face repo id, or a converted folder (which
            can be re-saved but not quantized again).
        dst: the output folder; it must not exist yet.
        bits: bits as ``mlx_voxtral.load``'s ``quantize`` (2, 3, 4, 5, 6 or 8 in the affine
            mode), a per-part dict, or None to keep full precision.
        group_size: weights per quantization group (affine: 32, 64 or 128); None: the mode's
            default (64 for affine).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the unquantized weights and
            the quantization scales; None keeps the source's dtype.
        upload_repo: also upload the folder to this Hugging Face repo.
        max_shard_bytes: largest safetensors shard.
        show_progress: show progress bars (stderr).
        mode: ``"affine"``, ``"mxfp4"``, ``"mxfp8"`` or ``"nvfp4"``; recorded in
            ``params.json``, so ``load(dst)`` quantizes the same way.
        layout: the folder's layout: ``"mlx-voxtral"`` (this package's) or ``"mlx-audio"``
            (what mlx-audio 0.6.2 loads: ``write_mlx_audio``; it needs the released model's
            decoder width and mel bins, ``MLX_AUDIO_FIXED``).

    Returns:
        The output folder.

    Raises:
        InvalidRequestError: bad bits, group size, mode (or a combination the mode does
            not have) or dtype, or ``dst`` already exists.
        CheckpointError: ``src`` is not a usable checkpoint, or is already quantized.
    """
    config = quantization_config(bits, group_size, mode)
    if layout not in LAYOUTS_WRITTEN:
        raise InvalidRequestError(f"layout must be one of {', '.join(LAYOUTS_WRITTEN)}, got {layout!r}")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(dst).expanduser()
    if out.exists():
        raise InvalidRequestError(f"{out} already exists; choose a new output folder")
    path = resolve_path(src)
    args = load_args(path)
    if args.quantization is not None and bits is not None:
        stored = check_stored_config(args.quantization)
        raise CheckpointError(
            f"{src} is already quantized ({describe(stored)}); quantize the original "
            "checkpoint instead"
        )
    if layout == "mlx-audio":
        check_mlx_audio(args)
    target = DTYPES[dtype] if dtype is not None else _stored_dtype(path)
    desc = "quantizing" if config else "converting"
    with tqdm(desc=desc, unit="group", disable=not show_progress) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        model = load(path, dtype=target, quantize=bits, group_size=group_size, progress=progress,
                     mode=mode, backend="mlx")  # nothing runs: the CPU backend's kernels are not needed

    out.mkdir(parents=True)
    if layout == "mlx-audio":
        write_mlx_audio(out, model, show_progress, max_shard_bytes)
    else:
        save_weights(out, dict(tree_flatten(model.parameters())), max_shard_bytes, show_progress)
        params = json.loads((path / "params.json").read_text())
        params.pop("quantization", None)
        if model.args.quantization is not None:
            params["quantization"] = model.args.quantization
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    shutil.copy(path / "tekken.json", out / "tekken.json")
    # a local folder is taken to be a copy of the released checkpoint
    base_model = DEFAULT_MODEL if Path(src).expanduser().exists() else str(src)
    name = upload_repo or out.name
    (out / "README.md").write_text(model_card(base_model, name, model.args.quantization, target))
    if upload_repo is not None:
        upload(out, upload_repo)
    return out


def _part_bits(value: str) -> Optional[int]:
    if value.lower() in ("none", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bits (such as 4) or none, got {value!r}") from None


def main(argv: Optional[list[str]] = None, prog: str = "python -m mlx_voxtral.convert") -> None:
    """``python -m mlx_voxtral.convert``: parse ``argv`` (default ``sys.argv[1:]``), call
    ``convert``; a ``VoxtralError`` is printed as ``error: ...`` and exits with status 2."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Voxtral Realtime checkpoint to MLX format, optionally quantized.",
    )
    parser.add_argument("--model", required=True, help="source folder or Hugging Face repo id")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--bits", type=int, default=None,
                        help="quantize to 2, 3, 4, 5, 6 or 8 bits (affine; mxfp4/nvfp4: 4, mxfp8: 8) "
                             "(default: keep full precision)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="weights per quantization group: 32, 64 or 128 for affine (default: "
                             "the mode's, 64 for affine)")
    parser.add_argument("--mode", default="affine",
                        help=f"quantization mode: {', '.join(MODES)} (default affine)")
    for part in PARTS:
        parser.add_argument(
            f"--{part}-bits", type=_part_bits, default=argparse.SUPPRESS, metavar="{BITS,none}",
            help=f"override the bits of the {part} (none: full precision)",
        )
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of unquantized weights and scales (default: the source's)")
    parser.add_argument("--layout", choices=LAYOUTS_WRITTEN, default="mlx-voxtral",
                        help="the folder's layout: this package's (default) or mlx-audio's")
    parser.add_argument("--upload-repo", default=None,
                        help="also upload the result to this Hugging Face repo")
    args = parser.parse_args(argv)
    overrides = {p: getattr(args, f"{p}_bits") for p in PARTS if hasattr(args, f"{p}_bits")}
    try:
        bits: QuantizeArg = args.bits
        if overrides:
            base = quantization_config(args.bits, args.group_size, args.mode)  # validates --bits
            bits = {**(base["parts"] if base else {}), **overrides}
        out = convert(args.model, args.out, bits, args.group_size, args.dtype, args.upload_repo,
                      mode=args.mode, layout=args.layout)
    except VoxtralError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
