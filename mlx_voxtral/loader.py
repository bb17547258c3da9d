"""Load a Voxtral Realtime checkpoint (local folder or Hugging Face repo) into MLX."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .exceptions import CheckpointError, InvalidRequestError
from .model import LAYOUTS, Model
from .quantize import (
    QuantizeArg,
    check_stored_config,
    class_predicate,
    describe,
    quantization_config,
    quantized_layer,
    stored_layers,
    summarize_layers,
)
from .tokenizer import Tokenizer

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
BACKENDS = ("auto", "mlx", "cpu")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_MATMUL_LAYERS = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
_CONFIGS = ["params.json", "config.json", "*.safetensors.index.json"]  # what tells the layout
# The weight files of each layout (beside its config file and tekken.json): a Hub download
# fetches only these. "native" is Mistral's consolidated file, or this package's own shards.
LAYOUT_WEIGHTS = {
    "native": "consolidated*.safetensors",
    "mlx-voxtral": "model*.safetensors",
    "voxmlx": "model*.safetensors",
    "transformers": "model*.safetensors",
    "mlx-audio": "model*.safetensors",  # its converter also copies consolidated.safetensors: not read
}
# The file holding each layout's model parameters (Mistral's params.json schema but transformers')
CONFIG_FILES = {"native": "params.json", "mlx-voxtral": "params.json", "voxmlx": "config.json",
                "transformers": "config.json", "mlx-audio": "config.json"}
# transformers' processor settings (the log-mel front end) beside its config.json: read where present
_PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
_TRANSFORMERS_CLASS = "VoxtralRealtimeForConditionalGeneration"
_OWN_PREFIXES = ("encoder.", "decoder.", "adapter.")  # this package's tensor names
_MLX_AUDIO_PREFIXES = ("encoder.transformer_layers.", "encoder.conv_layers_0_conv.")  # mlx-audio's


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def _is_mlx_audio(path: Path) -> bool:
    """mlx-audio's folder: its ``config.json`` (``model_type: voxtral_realtime``) with its own
    sections (``encoder_args``, ``decoder``), or, as its converter writes from a
    transformers-style source, with any sections and weights under its names."""
    if not (path / "config.json").exists():
        return False
    config = _read_json(path / "config.json")
    if config.get("model_type") != "voxtral_realtime":
        return False
    if "encoder_args" in config or "decoder" in config:
        return True
    index = path / "model.safetensors.index.json"
    return index.exists() and any(k.startswith(_MLX_AUDIO_PREFIXES) for k in _read_json(index).get("weight_map", {}))


def detect_layout(path: Path) -> str:
    """Which layout a checkpoint folder is in, told by its files (weights need not be there):

    * ``mlx-audio``: mlx-audio's ``config.json`` and ``model.safetensors`` (told first: its
      converter copies the source's ``params.json`` and ``consolidated.safetensors`` too);
    * ``native``: Mistral's ``params.json`` and ``consolidated.safetensors``;
    * ``mlx-voxtral``: ``params.json`` and shards under this package's names (``convert``);
    * ``voxmlx``: voxmlx's ``config.json`` (the native params) and its shards;
    * ``transformers``: the ``config.json`` and ``model*.safetensors`` that transformers'
      ``VoxtralRealtimeForConditionalGeneration.save_pretrained`` writes (``model_type``
      ``voxtral_realtime`` with ``audio_config`` and ``text_config``, or that architecture).

    Otherwise a folder with ``params.json`` is read as Mistral's (or this package's) layout,
    even where it also holds another layout's files, as Mistral's Hub repo does: only that
    layout's weights are read.

    Raises:
        CheckpointError: none of these (the message says what was found).
    """
    if _is_mlx_audio(path):
        return "mlx-audio"
    if (path / "params.json").exists():
        index = path / "model.safetensors.index.json"
        if index.exists() and all(k.startswith(_OWN_PREFIXES) for k in _read_json(index).get("weight_map", {})):
            return "mlx-voxtral"
        if not list(path.glob("consolidated*.safetensors")) and list(path.glob("model*.safetensors")):
            return "mlx-voxtral"
        return "native"
    if (path / "config.json").exists():
        config = _read_json(path / "config.json")
        if "multimodal" in config:
            return "voxmlx"
        hf_sections = "audio_config" in config and "text_config" in config
        if (config.get("model_type") == "voxtral_realtime" and hf_sections) or (
            _TRANSFORMERS_CLASS in (config.get("architectures") or []) and "encoder_args" not in config
        ):
            return "transformers"
        kind = config.get("model_type") or ", ".join(config.get("architectures", [])) or "no model_type"
        raise CheckpointError(f"{path}/config.json ({kind}) is not a Voxtral Realtime layout this package reads "
                              "(Mistral's native one, voxmlx's, mlx-audio's, transformers', or this package's)")
    raise CheckpointError(
        f"{path} has no params.json or config.json: not a Voxtral Realtime checkpoint "
        "(expected params.json, consolidated.safetensors, tekken.json)"
    )


def resolve_path(path_or_repo: Union[str, os.PathLike]) -> Path:
    """A local folder as is, else a Hugging Face repo id fetched (cache, offline mode
    honoured): its config files first, then only the weights of the layout they tell."""
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
        folder = Path(snapshot_download(name, allow_patterns=_CONFIGS))
        layout = detect_layout(folder)
        return Path(snapshot_download(name, allow_patterns=[*_CONFIGS, *_PROCESSOR_CONFIGS, "tekken.json",
                                                            "README.md", LAYOUT_WEIGHTS[layout]]))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{name!r} is neither a local folder nor a downloadable Hugging Face repo: {e}"
        ) from e


def load_args(path: Path, layout: Optional[str] = None) -> ModelArgs:
    """The model arguments of a checkpoint folder in ``layout`` (None: ``detect_layout``)."""
    layout = layout or detect_layout(path)
    file = path / CONFIG_FILES[layout]
    try:
        if layout == "transformers":
            return ModelArgs.from_transformers(_read_json(file), _feature_extractor(path))
        if layout == "mlx-audio":
            return ModelArgs.from_mlx_audio(_read_json(file))
        return ModelArgs.from_dict(_read_json(file))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: {e}") from e


def _feature_extractor(path: Path) -> Optional[dict]:
    """transformers' feature extractor settings beside a ``config.json``: the
    ``feature_extractor`` block of ``processor_config.json`` (transformers 5), or
    ``preprocessor_config.json`` (older); None where neither is there."""
    for name in _PROCESSOR_CONFIGS:
        if (path / name).exists():
            config = _read_json(path / name)
            return config.get("feature_extractor", config)
    return None


def load_weights(path: Path, layout: Optional[str] = None) -> dict[str, mx.array]:
    """Lazily open the safetensors files of the checkpoint's layout (nothing is read yet)."""
    layout = layout or detect_layout(path)
    files = sorted(path.glob(LAYOUT_WEIGHTS[layout]))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights (the {layout} layout's {LAYOUT_WEIGHTS[layout]})")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}") from e
    return weights


def _stored_part_error(path: str):
    raise CheckpointError(f"the checkpoint stores {path} quantized, but its quantization block leaves that part in "
                          "full precision")


def _spelling(layout: str) -> Callable[[str], str]:
    """How a layout's files spell one of this module tree's tensor names or module paths, for
    messages (the native mapping is not a renaming: its messages use this package's names)."""
    if layout in LAYOUTS:  # a module path as a name prefix, the trailing "." the table's parts end in
        return lambda name: next(iter(Model.to_layout({name + ".": None}, layout)))[:-1]
    return lambda name: name


def _check_weights(model: nn.Module, weights: dict[str, mx.array], spell: Callable[[str], str] = str) -> None:
    """Fail loudly, naming tensors (as ``spell`` writes them: as the checkpoint's files do), if
    the checkpoint and the model do not match one to one."""
    expected = dict(tree_flatten(model.parameters()))
    unused = sorted(spell(k) for k in set(weights) - set(expected))
    missing = sorted(spell(k) for k in set(expected) - set(weights))
    shapes = sorted(
        f"{spell(k)}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
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


def load_group(name: str) -> str:
    """The group a tensor or module path loads (and is quantized) with: one encoder/decoder
    layer (``decoder.layers.3``), else its top two parts (``decoder.tok_embeddings``)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])


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
        groups.setdefault(load_group(name), []).append(name)
    for done, (key, names) in enumerate(groups.items(), start=1):
        chunk = [(name, cast(name, weights.pop(name))) for name in names]
        model.load_weights(chunk, strict=False)
        del chunk  # the model holds the group's tensors; quantizing drops the float ones
        pending = {path for path in quantized if path.startswith(key + ".") or path == key}
        if pending:
            leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
            model.update_modules(tree_unflatten([(p, quantized_layer(leaves[p], **predicate(p, leaves[p])))
                                                 for p in pending]))
            del leaves
        mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(key + ".")])
        if pending:
            mx.clear_cache()  # quantizing's scratch (large in the fp modes) would stay resident in MLX's cache
        if progress is not None:
            progress(done, len(groups))


def parse_dtype(dtype: Union[None, str, mx.Dtype]) -> Optional[mx.Dtype]:
    """``None``, an ``mx.Dtype`` or its name ("float32", "float16", "bfloat16")."""
    if dtype is None or (isinstance(dtype, mx.Dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)} (or an mx.Dtype), got {dtype!r}")


def resolve_backend(backend: Optional[str] = None) -> str:
    """``"mlx"`` or ``"cpu"`` for a choice of ``"auto"``, ``"mlx"`` or ``"cpu"`` (``None``:
    ``$MLX_VOXTRAL_BACKEND``, else ``"auto"``).

    ``"auto"`` is the CPU backend on Linux computing on the CPU where its kernels build, the
    plain MLX modules everywhere else (Apple Silicon, a GPU). Asking for ``"cpu"`` where it
    cannot run is an ``InvalidRequestError`` that says why.
    """
    if backend is None:
        backend = os.environ.get("MLX_VOXTRAL_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "mlx":
        return "mlx"
    from . import cpu

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    if backend == "auto":
        return "cpu" if on_cpu and cpu.available() else "mlx"
    if not on_cpu:
        raise InvalidRequestError(f"backend 'cpu' needs MLX to compute on the CPU, but its default device is "
                                  f"{mx.default_device()}")
    if not cpu.available():
        raise InvalidRequestError(f"backend 'cpu' cannot run here: {cpu.unavailable_reason()}")
    return "cpu"


def load(
    path_or_repo: Union[str, os.PathLike] = DEFAULT_MODEL,
    dtype: Union[None, str, mx.Dtype] = None,
    quantize: QuantizeArg = None,
    group_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    backend: Optional[str] = None,
    mode: str = "affine",
) -> Model:
    """Load a Voxtral Realtime model and its tokenizer (``model.tokenizer``).

    Args:
        path_or_repo: a folder with ``params.json``, ``*.safetensors`` and ``tekken.json``
            (Mistral's native checkpoint, or one written by ``mlx_voxtral.convert``, quantized
            or not), another layout ``detect_layout`` tells (a voxmlx folder, transformers'
            ``save_pretrained`` folder: ``config.json``, ``model*.safetensors``, with
            ``tekken.json`` beside them; a stored quantization as stored), or a Hugging Face
            repo id (downloaded and cached).
        dtype: dtype of the floating weights (and of quantization scales): an ``mx.Dtype`` or
            ``"float32"``, ``"float16"``, ``"bfloat16"``. ``None`` keeps the checkpoint's (on the
            CPU backend: for the matmul weights; every other parameter becomes float32 there).
        quantize: quantize while loading, layer by layer: bits (2, 3, 4, 5, 6 or 8 in the
            ``affine`` mode; decoder, encoder and embedding/LM head at that width, the adapter
            at >= 8 bits: the policy measured in ``mlx_voxtral.quantize``), or a dict such as
            ``{"decoder": 4, "encoder": 8, "embedding": 4, "adapter": 8}`` (parts not named
            stay full precision). A folder
            that is already quantized is loaded as stored and must not be given ``quantize``.
        group_size: weights per quantization group when quantizing (affine: 32, 64 or 128;
            None: the mode's default, 64 for affine); a layer whose input size it does not
            divide stays full precision.
        progress: called as ``progress(groups_done, groups_total)`` while weights load.
        backend: ``"mlx"`` (the plain MLX modules: what a Mac runs), ``"cpu"`` (the Linux CPU
            backend, ``mlx_voxtral.cpu``) or ``"auto"``; default ``$MLX_VOXTRAL_BACKEND`` or
            ``"auto"`` (see ``resolve_backend``). ``model.backend`` says which one runs.
        mode: quantization mode when quantizing: ``"affine"``, ``"mxfp4"`` (4 bits, group
            32), ``"mxfp8"`` (8 bits, group 32) or ``"nvfp4"`` (4 bits, group 16). A converted
            folder records its own.

    Raises:
        CheckpointError: not a Voxtral Realtime checkpoint, weights that do not match, or
            ``quantize`` given for an already quantized folder.
        InvalidRequestError: unsupported ``quantize`` bits, ``group_size`` or ``mode`` (or a
            combination the mode does not have), ``dtype`` or ``backend``.
    """
    dtype = parse_dtype(dtype)
    config = quantization_config(quantize, group_size, mode)
    backend = resolve_backend(backend)
    path = resolve_path(path_or_repo)
    layout = detect_layout(path)
    args = load_args(path, layout)
    if not (path / "tekken.json").exists():
        how = ""
        if layout == "transformers":
            how = ("; transformers' model save_pretrained writes none: VoxtralRealtimeProcessor's save_pretrained "
                   "into the same folder writes it")
        raise CheckpointError(f"{path} has no tekken.json: the tokenizer ({layout} layout; Mistral's tekken.json "
                              f"from {DEFAULT_MODEL} belongs beside the weights{how})")
    model = Model(args)
    in_situ = None
    files = load_weights(path, layout)
    weights = Model.sanitize(files, layout, args)
    stored_names = list(files)
    del files  # ``weights`` must hold the only references: each group's float tensors go once loaded
    spell = _spelling(layout)
    if layout in LAYOUTS:  # names sanitize passes through, but that project does not write
        strays = sorted(n for n in stored_names if spell(next(iter(Model.sanitize({n: None}, layout)))) != n)
        if strays:
            raise CheckpointError(f"{path} is in {layout}'s layout but {len(strays)} tensors are not under its names: "
                                  f"{', '.join(strays[:20])}")
    if args.quantization is not None:
        if layout in ("native", "mlx-voxtral"):
            stored = check_stored_config(args.quantization)
            # mlx-lm's convention: a layer is quantized where the checkpoint stores its scales,
            # with the bits its part is stored at (the lazy, never computed contents are replaced)
            bits_of = class_predicate(stored)
            quantized = lambda p, m: f"{p}.scales" in weights and (bits_of(p, m) or _stored_part_error(p))  # noqa: E731
        else:  # another project's choice of layers: each as its stored shapes say
            layers = stored_layers(model, weights, args.quantization.get("mode", "affine"), spell)
            stored = summarize_layers(layers)
            quantized = lambda p, m: layers.get(p, False)  # noqa: E731
        if quantize is not None:
            raise CheckpointError(
                f"{path} is already quantized ({describe(stored)}); load it without "
                "quantize, or quantize the original (unquantized) checkpoint instead"
            )
        config = stored
        nn.quantize(model, class_predicate=quantized)
    elif config is not None:
        in_situ = class_predicate(config)
    _check_weights(model, weights, spell)
    tokenizer = Tokenizer(path / "tekken.json")  # after the weights' checks: they fail sooner
    float_dtype = None
    if backend == "cpu":
        from . import cpu

        float_dtype = cpu.FLOAT_DTYPE if dtype is None else None
    _materialize(model, weights, dtype, float_dtype, in_situ, progress)
    args.quantization = config
    if backend == "cpu":
        cpu.install(model)
    model.eval()
    model.backend = backend
    model.tokenizer = tokenizer
    model.path = path
    model.layout = layout
    return model
