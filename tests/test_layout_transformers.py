"""transformers' layout: the folder ``VoxtralRealtimeForConditionalGeneration.save_pretrained``
writes (``config.json``, ``model*.safetensors``), with the ``tekken.json`` its processor's
``save_pretrained`` writes beside it, loads to exactly the native checkpoint's model.

The folders are written by transformers itself, from the model tests/reference.py builds out
of the tiny random native checkpoint (transformers' conversion mapping: renamed tensors, torch
conv kernels, q/k rows permuted for half-split RoPE).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_voxtral
from mlx_voxtral import CheckpointError
from mlx_voxtral.loader import detect_layout, load_args

from conftest import require_cpu_backend, rewrite_tensors

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

AUDIO = (0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
         + 0.05 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)  # 1 s


@pytest.fixture(scope="module")
def hf_folders(reference, tmp_path_factory) -> dict[str, Path]:
    """transformers' folders of the tiny checkpoint: ``float32`` (one file) and ``bfloat16``
    (the checkpoint's own dtype, sharded as on the Hub), each with what the processor's
    ``save_pretrained`` writes (tekken.json, processor_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    folders = {"float32": root / "float32", "bfloat16": root / "bfloat16"}
    reference.model.save_pretrained(folders["float32"], safe_serialization=True)
    bf16 = copy.deepcopy(reference.model).to(torch.bfloat16)
    bf16.save_pretrained(folders["bfloat16"], safe_serialization=True, max_shard_size="20MB")
    del bf16
    for folder in folders.values():
        reference.processor.save_pretrained(folder)
    return folders


@pytest.fixture(scope="module")
def native(tiny_checkpoint):
    """The native checkpoint loaded on the MLX backend: float32, and as stored (bf16)."""
    return {"float32": mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32, backend="mlx"),
            "bfloat16": mlx_voxtral.load(tiny_checkpoint, backend="mlx")}


@pytest.fixture(scope="module")
def native_ids(native) -> dict[str, list[int]]:
    return {dtype: mlx_voxtral.transcribe(model, AUDIO).token_ids for dtype, model in native.items()}


def _parameters(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def test_folders_are_transformers_own(hf_folders):
    """The fixture is what a user has: transformers' tensor names, torch conv kernels, shards."""
    for dtype, folder in hf_folders.items():
        files = sorted(p.name for p in folder.iterdir())
        assert "config.json" in files and "tekken.json" in files and "processor_config.json" in files
        shards = sorted(folder.glob("model*.safetensors"))
        names = {k: v for f in shards for k, v in mx.load(str(f)).items()}
        assert "audio_tower.embedder.conv1.weight" in names and "language_model.model.norm.weight" in names
        assert names["audio_tower.embedder.conv1.weight"].shape == (128, 128, 3)  # [out, in, k]
        assert names["language_model.model.norm.weight"].dtype == getattr(mx, dtype)
    assert len(list(hf_folders["bfloat16"].glob("model-*-of-*.safetensors"))) > 1


def test_layout_and_args(hf_folders, tiny_checkpoint):
    """Every model argument read off config.json (and the processor's log-mel settings) is the
    native params.json's."""
    for folder in hf_folders.values():
        assert detect_layout(folder) == "transformers"
        assert load_args(folder) == load_args(tiny_checkpoint)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_model_as_native(hf_folders, native, native_ids, dtype):
    """Loaded on the MLX backend, the transformers folder is the native checkpoint: every
    parameter array-equal (same dtype), and the same greedy ids."""
    model = mlx_voxtral.load(hf_folders[dtype], dtype=None if dtype == "bfloat16" else mx.float32, backend="mlx")
    assert model.layout == "transformers"
    ours, theirs = _parameters(model), _parameters(native[dtype])
    assert sorted(ours) == sorted(theirs)
    for name, w in theirs.items():
        assert ours[name].dtype == w.dtype == getattr(mx, dtype), name
        assert mx.array_equal(ours[name], w).item(), name
    ids = mlx_voxtral.transcribe(model, AUDIO).token_ids
    assert ids == native_ids[dtype] and len(ids) > 0


@pytest.mark.parametrize("layout", ["mlx-voxtral", "voxmlx"])
def test_converts_to_other_layouts(hf_folders, native, layout, tmp_path):
    """``convert`` of a transformers folder writes the native arguments (``ModelArgs.to_params``)
    and the same tensors: the folder loads back as the native checkpoint."""
    out = mlx_voxtral.convert(hf_folders["bfloat16"], tmp_path / "out", layout=layout, show_progress=False)
    model = mlx_voxtral.load(out, backend="mlx")
    assert model.layout == layout and model.args == native["bfloat16"].args
    ours, theirs = _parameters(model), _parameters(native["bfloat16"])
    assert sorted(ours) == sorted(theirs) and all(mx.array_equal(ours[k], w).item() for k, w in theirs.items())


def test_same_ids_on_cpu_backend(hf_folders, tiny_checkpoint):
    require_cpu_backend()
    ours = mlx_voxtral.load(hf_folders["float32"], dtype=mx.float32, backend="cpu")
    theirs = mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32, backend="cpu")
    assert ours.backend == "cpu" and ours.layout == "transformers"
    assert mlx_voxtral.transcribe(ours, AUDIO).token_ids == mlx_voxtral.transcribe(theirs, AUDIO).token_ids


def test_folder_with_both_layouts_reads_only_native(hf_folders, tiny_checkpoint, native, native_ids, tmp_path,
                                                    monkeypatch):
    """Mistral's Hub repo holds params.json + consolidated.safetensors and transformers'
    config.json + model-*.safetensors: it loads as native and never opens transformers' files."""
    both = tmp_path / "both"
    shutil.copytree(hf_folders["bfloat16"], both)
    for f in tiny_checkpoint.iterdir():
        shutil.copy(f, both / f.name)
    assert detect_layout(both) == "native"
    opened = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda file, *a, **k: opened.append(Path(file).name) or real_load(file, *a, **k))
    model = mlx_voxtral.load(both, backend="mlx")
    assert model.layout == "native" and opened == ["consolidated.safetensors"]
    assert mlx_voxtral.transcribe(model, AUDIO).token_ids == native_ids["bfloat16"]


def test_hub_download_fetches_one_layout(hf_folders, tiny_checkpoint, tmp_path, monkeypatch):
    """A repo id downloads the config files, then only the weights of the layout they tell."""
    import fnmatch

    import huggingface_hub

    from mlx_voxtral.loader import resolve_path

    repos = {"someone/hf-only": hf_folders["bfloat16"], "someone/both": tmp_path / "both-repo"}
    shutil.copytree(hf_folders["bfloat16"], repos["someone/both"])
    for f in tiny_checkpoint.iterdir():
        shutil.copy(f, repos["someone/both"] / f.name)

    def snapshot_download(repo_id, allow_patterns):
        out = tmp_path / "cache" / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hf_only = resolve_path("someone/hf-only")
    assert sorted(p.name for p in hf_only.iterdir()) == sorted(
        p.name for p in hf_folders["bfloat16"].iterdir() if p.name != "generation_config.json")
    both = resolve_path("someone/both")
    assert not list(both.glob("model*.safetensors")) and (both / "consolidated.safetensors").exists()
    assert (both / "config.json").exists()  # a config file: it is what tells the layout


@pytest.fixture
def broken(hf_folders, tmp_path) -> Path:
    """A fresh copy of the float32 transformers folder to damage."""
    out = tmp_path / "hf"
    shutil.copytree(hf_folders["float32"], out)
    return out


def _rewrite(folder: Path, edit) -> None:
    rewrite_tensors(folder / "model.safetensors", edit)


def test_unknown_missing_misshaped_tensors_are_named(broken):
    _rewrite(broken, lambda w: w.update({"audio_tower.layers.0.self_attn.rotary.weight": mx.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"unused checkpoint tensors: encoder\.layers\.0\.self_attn\.rotary"):
        mlx_voxtral.load(broken, backend="mlx")
    _rewrite(broken, lambda w: (w.pop("audio_tower.layers.0.self_attn.rotary.weight"),
                                w.pop("language_model.model.layers.1.ada_rms_norm.linear2.weight")))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: decoder\.layers\.1\.ada_up\.weight"):
        mlx_voxtral.load(broken, backend="mlx")
    _rewrite(broken, lambda w: w.update({
        "language_model.model.layers.1.ada_rms_norm.linear2.weight": mx.zeros((128, 32)),
        "multi_modal_projector.linear_2.weight": mx.zeros((128, 64)),
    }))
    with pytest.raises(CheckpointError, match=r"adapter\.w_out\.weight: checkpoint \(128, 64\) vs model \(128, 128\)"):
        mlx_voxtral.load(broken, backend="mlx")


def test_missing_tekken_says_where_to_get_it(broken):
    (broken / "tekken.json").unlink()
    with pytest.raises(CheckpointError, match="no tekken.json") as e:
        mlx_voxtral.load(broken, backend="mlx")
    assert "mistralai/Voxtral-Mini-4B-Realtime-2602" in str(e.value)
    assert "VoxtralRealtimeProcessor" in str(e.value)


def _config(folder: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "config-only"
    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("edit, message", [
    # offline Voxtral's config: the same sections, another model
    (lambda c: c.update(model_type="voxtral", architectures=["VoxtralForConditionalGeneration"]),
     r"\(voxtral\) is not a Voxtral Realtime layout"),
    (lambda c: (c.update(model_type="llama"), c.pop("audio_config")),
     "model_type 'llama', no audio_config: not transformers' Voxtral Realtime config"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config.hidden_act is 'gelu'"),
    (lambda c: c["audio_config"]["rope_parameters"].update(rope_type="yarn"), "audio_config.rope type is 'yarn'"),
    (lambda c: c.update(audio_length_per_tok=4), "audio_length_per_tok 4 is not 2 x downsample_factor"),
    (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}), r"quantized by transformers \(bitsand"),
])
def test_configs_this_model_is_not(hf_folders, tmp_path, edit, message):
    folder = _config(hf_folders["float32"], tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        mlx_voxtral.load(folder, backend="mlx")


def test_config_lacking_a_size_is_named(hf_folders, tmp_path):
    folder = _config(hf_folders["float32"], tmp_path, lambda c: c["text_config"].pop("intermediate_size"))
    with pytest.raises(CheckpointError, match="config.json lacks 'intermediate_size' in audio_config or text_config"):
        mlx_voxtral.load(folder, backend="mlx")
