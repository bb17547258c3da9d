"""Convert a Voxtral Realtime checkpoint to an MLX-format folder, optionally quantized.

    python -m mlx_voxtral.convert --model mistralai/Voxtral-Mini-4B-Realtime-2602 \\
        --out voxtral-4bit --bits 4 --group-size 64 [--mode affine] [--encoder-bits 8] [--upload-repo ME/REPO]
    python -m mlx_voxtral.convert --model ... --out voxtral-voxmlx-4bit --layout voxmlx --bits 4

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

``--layout voxmlx`` writes voxmlx's layout instead (voxmlx 0.0.2 ``voxmlx.weights.load_model``
reads it, and so does ``mlx_voxtral.load``): ``config.json`` (the source's model parameters
plus, when quantized, voxmlx's ``{"group_size", "bits"}``), the shards under voxmlx's tensor
names (``mlx_voxtral.model.LAYOUTS``) with their index, and ``tekken.json``. voxmlx re-creates a
quantized model from that one pair, quantizing every Linear/Embedding whose input size the
group size divides (``quantize.every_layer``), so such a folder is quantized that way: one
affine width for all of them, the adapter and the ada-norm MLPs included, not this package's
per-part policy. The float model is loaded whole before it is quantized group by group.

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
from .loader import (
    CONFIG_FILES,
    DEFAULT_MODEL,
    detect_layout,
    load,
    load_args,
    load_group,
    load_weights,
    resolve_path,
)
from .model import LAYOUTS, Model, _rename
from .quantize import (
    MODE,
    MODES,
    PARTS,
    QuantizeArg,
    check_stored_config,
    class_predicate,
    describe,
    every_layer,
    quantization_config,
    quantized_layers,
    summarize_layers,
    unlike,
)

MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
LAYOUTS_WRITTEN = ("mlx-voxtral", "voxmlx", "mlx-audio")  # this package's (the default), voxmlx's, mlx-audio's


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


def model_card(base_model: str, name: str, config: Optional[dict], dtype: mx.Dtype,
               layout: str = "mlx-voxtral") -> str:
    """README.md for a converted folder: Hub metadata and how to use it."""
    from . import __version__

    tags = ["mlx", "voxtral", "speech-recognition", "streaming"]
    if config is None:
        weights = f"Weights in {str(dtype).split('.')[-1]}, not quantized."
    else:
        tags.append(f"{config['bits']}-bit")
        weights = (
            f"Quantized with group-wise {config.get('mode', 'affine')} quantization: {describe(config)}. The conv stem, "
            + ("norms and ada-norm MLPs stay" if layout == "mlx-voxtral" else
               "norms and the layers whose input size the group size does not divide stay") + " in full precision."
        )
    voxmlx = "" if layout != "voxmlx" else f"""
The folder is in [voxmlx](https://github.com/awnihannun/voxmlx)'s layout, so voxmlx reads it too:

```python
from voxmlx import transcribe

print(transcribe("speech.wav", model_path="{name}"))
```
"""
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
{voxmlx}"""


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
        src: a native checkpoint folder, a Hugging Face repo id, or a converted folder (this
            package's or voxmlx's; it can be re-saved but not quantized again).
        dst: the output folder; it must not exist yet.
        bits: bits as ``mlx_voxtral.load``'s ``quantize`` (2, 3, 4, 5, 6 or 8 in the affine
            mode), a per-part dict, or None to keep full precision. With ``layout="voxmlx"``:
            bits only, for every layer voxmlx quantizes (``quantize.every_layer``).
        group_size: weights per quantization group (affine: 32, 64 or 128); None: the mode's
            default (64 for affine).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the unquantized weights and
            the quantization scales; None keeps the source's dtype.
        upload_repo: also upload the folder to this Hugging Face repo.
        max_shard_bytes: largest safetensors shard.
        show_progress: show progress bars (stderr).
        mode: ``"affine"``, ``"mxfp4"``, ``"mxfp8"`` or ``"nvfp4"``; recorded in
            ``params.json``, so ``load(dst)`` quantizes the same way (``layout="voxmlx"``:
            affine only).
        layout: the folder's layout (``LAYOUTS_WRITTEN``): ``"mlx-voxtral"`` (this
            package's), ``"voxmlx"`` (see the module docstring) or ``"mlx-audio"`` (what
            mlx-audio 0.6.2 loads: ``write_mlx_audio``; it needs the released model's decoder
            width and mel bins, ``MLX_AUDIO_FIXED``).

    Returns:
        The output folder.

    Raises:
        InvalidRequestError: bad bits, group size, mode (or a combination the mode does
            not have), dtype or layout; per-part bits or a mode other than affine for the
            voxmlx layout; or ``dst`` already exists.
        CheckpointError: ``src`` is not a usable checkpoint, is already quantized (and
            ``bits`` is given), or is quantized in a way the chosen layout cannot record.
    """
    if layout not in LAYOUTS_WRITTEN:
        raise InvalidRequestError(f"layout must be one of {', '.join(LAYOUTS_WRITTEN)}, got {layout!r}")
    if layout == "voxmlx" and bits is not None:
        if isinstance(bits, dict):
            raise InvalidRequestError(
                "the voxmlx layout takes one width for every layer (voxmlx 0.0.2 reads a single "
                "{group_size, bits} pair and quantizes every Linear/Embedding with it), not per-part bits")
        if mode != MODE:
            raise InvalidRequestError(f"the voxmlx layout is affine-quantized only (voxmlx 0.0.2 records no mode), "
                                      f"got mode {mode!r}")
    config = quantization_config(bits, group_size, mode)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(dst).expanduser()
    if out.exists():
        raise InvalidRequestError(f"{out} already exists; choose a new output folder")
    path = resolve_path(src)
    args = load_args(path)
    if args.quantization is not None and bits is not None:
        q = args.quantization
        stored = (f"{q.get('bits')}-bit, group size {q.get('group_size')}" if detect_layout(path) == "voxmlx"
                  else describe(check_stored_config(q)))
        raise CheckpointError(f"{src} is already quantized ({stored}); quantize the original checkpoint instead")
    if layout == "mlx-audio":
        check_mlx_audio(args)
    target = DTYPES[dtype] if dtype is not None else _stored_dtype(path)
    desc = "quantizing" if config else "converting"
    with tqdm(desc=desc, unit="group", disable=not show_progress) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        in_situ = layout != "voxmlx"  # voxmlx's selection is not a per-part policy
        # backend "mlx": nothing runs, so the CPU backend's kernels are not needed
        model = load(path, dtype=target, quantize=bits if in_situ else None, group_size=group_size,
                     progress=progress, mode=mode, backend="mlx")

    if layout == "voxmlx":
        if config is not None:
            _quantize_every_layer(model, config["bits"], config["group_size"])
        saved = _voxmlx_quantization(model, src)
    else:
        saved = model.args.quantization
        if saved is not None and model.layout not in ("native", "mlx-voxtral"):
            # another project's quantized folder: this layout records a per-part policy
            # (``class_predicate``), which must re-create every layer as stored
            odd = unlike(model, class_predicate(saved))
            if odd:
                raise CheckpointError(
                    f"{src} ({model.layout} layout) is quantized in layers this package's layout cannot record "
                    f"({len(odd)}: {'; '.join(odd[:5])}); convert the original checkpoint instead"
                    + (", or write --layout voxmlx" if _voxmlx_quantization(model, None, strict=False) else ""))
    out.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    # the source's own params.json where it has one (every key kept), else its arguments as one
    native = CONFIG_FILES[model.layout] == "params.json" or model.layout == "voxmlx"
    params = json.loads((path / CONFIG_FILES[model.layout]).read_text()) if native else model.args.to_params()
    params.pop("quantization", None)
    if layout == "mlx-audio":
        write_mlx_audio(out, model, show_progress, max_shard_bytes)
    elif layout == "voxmlx":
        save_weights(out, Model.to_layout(weights, "voxmlx"), max_shard_bytes, show_progress)
        if saved is not None:
            params["quantization"] = saved
        (out / "config.json").write_text(json.dumps(params, indent=2) + "\n")
    else:
        save_weights(out, weights, max_shard_bytes, show_progress)
        if saved is not None:
            params["quantization"] = saved
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    shutil.copy(path / "tekken.json", out / "tekken.json")
    # a local folder is taken to be a copy of the released checkpoint
    base_model = DEFAULT_MODEL if Path(src).expanduser().exists() else str(src)
    name = upload_repo or out.name
    (out / "README.md").write_text(model_card(base_model, name, model.args.quantization, target, layout))
    if upload_repo is not None:
        upload(out, upload_repo)
    return out


def _quantize_every_layer(model: Model, bits: int, group_size: int) -> None:
    """Quantize ``model`` (loaded in full precision) as voxmlx does (``every_layer``), one
    layer group at a time, each evaluated before the next, so the float weights it replaces
    go as it goes; ``model.args.quantization`` becomes the per-part summary."""
    predicate = every_layer(bits, group_size)
    groups: dict[str, None] = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if predicate(path, m):
            groups[load_group(path)] = None
    for key in groups:
        nn.quantize(model, class_predicate=lambda p, m: (p == key or p.startswith(key + ".")) and predicate(p, m))
        mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(key + ".")])
    model.args.quantization = summarize_layers(quantized_layers(model))


def _voxmlx_quantization(model: Model, src, strict: bool = True) -> Optional[dict]:
    """voxmlx's ``{"group_size", "bits"}`` for ``model`` (None: not quantized). Its layers must
    be what voxmlx makes of that pair (``every_layer``): else a CheckpointError naming them
    (``strict``), or None."""
    layers = quantized_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    odd = [] if first["mode"] == MODE else [f"mode {first['mode']}"]
    odd = odd or unlike(model, every_layer(first["bits"], first["group_size"]))
    if not odd:
        return {"group_size": first["group_size"], "bits": first["bits"]}
    if not strict:
        return None
    raise CheckpointError(
        f"{src} is quantized in a way voxmlx 0.0.2 cannot read (it quantizes every Linear/Embedding whose input "
        f"size the group size divides, at one affine width): {len(odd)} layers differ from "
        f"{first['bits']}-bit group {first['group_size']}: {'; '.join(odd[:5])}; convert the original checkpoint "
        "with --layout voxmlx --bits N instead")


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
    parser.add_argument("--layout", choices=LAYOUTS_WRITTEN, default="mlx-voxtral",
                        help="folder layout: this package's (default), voxmlx's (one --bits for every "
                             "layer, as voxmlx reads it) or mlx-audio's")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of unquantized weights and scales (default: the source's)")
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
