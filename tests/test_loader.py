"""Loading checkpoints: local folders, Hugging Face repo ids (cache/offline), loud failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral import CheckpointError

from conftest import rewrite_tensors


@pytest.fixture
def broken(tiny_checkpoint, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint to damage."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    return out


def _rewrite_weights(path: Path, edit) -> None:
    rewrite_tensors(path / "consolidated.safetensors", edit)


def test_load_local_folder(tiny_checkpoint):
    model = mlx_voxtral.load(tiny_checkpoint)
    # matmul weights keep the checkpoint's dtype; on CPU everything else is float32 so
    # that activations are float32 (MLX's CPU bf16 arithmetic is slow and inexact)
    assert model.decoder.layers[0].attention.wq.weight.dtype == mx.bfloat16
    assert model.decoder.tok_embeddings.weight.dtype == mx.bfloat16
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert model.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    assert model.tokenizer.eos_id == 2
    assert model.args.encoder.sliding_window == 750 and model.args.n_kv_heads == 2
    fp32 = mlx_voxtral.load(str(tiny_checkpoint), dtype=mx.float32)
    assert fp32.dtype == mx.float32
    w = np.array(fp32.encoder.conv_layers[0].weight)
    assert w.shape == (128, 3, 128)  # conv kernels moved to MLX's [out, k, in]


def test_missing_and_wrong_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        mlx_voxtral.load(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="no params.json"):
        mlx_voxtral.load(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32}))
    with pytest.raises(CheckpointError, match="not a Voxtral checkpoint"):
        mlx_voxtral.load(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mlx_voxtral.load(tmp_path)
    file = tmp_path / "file.bin"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        mlx_voxtral.load(file)


def test_offline_voxtral_is_rejected(broken):
    params = json.loads((broken / "params.json").read_text())
    del params["ada_rms_norm_t_cond"]
    (broken / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="not Voxtral Realtime"):
        mlx_voxtral.load(broken)


def test_unused_tensor_is_named(broken):
    _rewrite_weights(broken, lambda w: w.update({"layers.0.attention.extra.weight": mx.zeros((2,))}))
    with pytest.raises(CheckpointError, match=r"1 unused checkpoint tensors: decoder.layers.0.attention.extra.weight"):
        mlx_voxtral.load(broken)


def test_missing_tensor_is_named(broken):
    _rewrite_weights(broken, lambda w: w.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: decoder.layers.1.ffn_norm.weight"):
        mlx_voxtral.load(broken)


def test_misshaped_tensor_is_named(broken):
    _rewrite_weights(broken, lambda w: w.update({"norm.weight": mx.ones((7,))}))
    with pytest.raises(CheckpointError, match=r"decoder.norm.weight: checkpoint \(7,\) vs model \(128,\)"):
        mlx_voxtral.load(broken)


def test_missing_tokenizer(broken):
    (broken / "tekken.json").unlink()
    with pytest.raises(CheckpointError, match="no tekken.json"):
        mlx_voxtral.load(broken)


def test_tokenizer_without_streaming_audio(broken):
    tekken = json.loads((broken / "tekken.json").read_text())
    del tekken["audio"]
    (broken / "tekken.json").write_text(json.dumps(tekken))
    with pytest.raises(CheckpointError, match="not a Voxtral Realtime tokenizer"):
        mlx_voxtral.load(broken)


def test_corrupt_weights(broken):
    (broken / "consolidated.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read"):
        mlx_voxtral.load(broken)
    (broken / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        mlx_voxtral.load(broken)


def _fake_hub_cache(cache: Path, repo: str, source: Path) -> None:
    """Lay out a Hugging Face hub cache entry the way huggingface_hub writes one."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("params.json", "tekken.json", "consolidated.safetensors"):
        shutil.copy(source / f, snap / f)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_repo_id_from_cache_offline(tiny_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/voxtral-tiny", tiny_checkpoint)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    code = (
        "import mlx_voxtral, sys\n"
        "m = mlx_voxtral.load('someone/voxtral-tiny')\n"
        "print(m.path)\n"
        "try:\n"
        "    mlx_voxtral.load('someone/not-cached')\n"
        "except mlx_voxtral.CheckpointError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(str(cache)) and "snapshots" in lines[0]
    assert lines[1].startswith("ERR") and "someone/not-cached" in lines[1]
