"""mlx-audio's folders (mlx-audio 0.6.2, ``voxtral_realtime``): made by mlx-audio's own
converter from a random native checkpoint, loaded here; and folders written here with
``convert --layout mlx-audio``, loaded and run by mlx-audio.

mlx-audio 0.6.2 fixes its adapter's output at 3072 (the released decoder width), so the
checkpoint here is the tiny one with a 3072-wide decoder and a small vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_voxtral
from mlx_voxtral.convert import convert, main
from mlx_voxtral.exceptions import CheckpointError, InvalidRequestError
from mlx_voxtral.loader import LAYOUT_WEIGHTS, detect_layout

from conftest import make_checkpoint, require_cpu_backend, rewrite_tensors

pytest.importorskip("mlx_audio")

ALL = ("decoder", "encoder", "embedding", "adapter")  # mlx-audio quantizes every part alike


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mlx_audio") / "wide", "--decoder-dim", "3072",
                           "--vocab-size", "2048")


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """1 s of noise shaped by a slow sine (16 kHz float32)."""
    rng = np.random.default_rng(0)
    return (0.1 * np.sin(np.linspace(0, 2000, 16000)) * rng.standard_normal(16000)).astype(np.float32)


def mlx_audio_source(native: Path, out: Path) -> Path:
    """``native`` with the config.json mlx-audio 0.6.2's converter reads (it reads no
    params.json): the schema of the mlx-community folders, the decoder's parameters under
    ``decoder`` and the encoder's (with ``downsample_factor``) under ``encoder_args``."""
    shutil.copytree(native, out)
    params = json.loads((native / "params.json").read_text())
    whisper = params["multimodal"]["whisper_model_args"]
    decoder = {k: params[k] for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                                      "vocab_size", "norm_eps", "rope_theta", "sliding_window", "tied_embeddings",
                                      "ada_rms_norm_t_cond", "ada_rms_norm_t_cond_dim")}
    encoder = {**whisper["encoder_args"], "downsample_factor": whisper["downsample_args"]["downsample_factor"]}
    config = {"model_type": "voxtral_realtime", "decoder": decoder, "encoder_args": encoder}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def theirs(wide, tmp_path_factory, monkeypatch_module) -> dict:
    """Folders written by mlx-audio's converter: float, 4-bit and 8-bit (its default group
    size 64). ``model_domain="stt"`` skips its domain detection, which imports every TTS
    model (one downloads a codec at import); a local path downloads nothing."""
    from mlx_audio.convert import convert as mlx_audio_convert

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("theirs")
    src = mlx_audio_source(wide, root / "src")
    folders = {}
    for bits in (None, 4, 8):
        out = root / f"q{bits}"
        mlx_audio_convert(hf_path=str(src), mlx_path=str(out), quantize=bits is not None, q_bits=bits,
                          model_domain="stt")
        folders[bits] = out
    return folders


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_arrays(a, b) -> None:
    a, b = params(a), params(b)
    assert a.keys() == b.keys()
    unequal = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not mx.array_equal(a[k], b[k])]
    assert not unequal, unequal[:10]


def test_converter_output_is_detected_as_mlx_audio(theirs):
    folder = theirs[4]
    # mlx-audio's converter copies the source's params.json and consolidated.safetensors too
    assert (folder / "params.json").exists() and (folder / "consolidated.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert detect_layout(folder) == "mlx-audio"
    assert detect_layout(theirs[None]) == "mlx-audio"
    assert sorted(p.name for p in folder.glob(LAYOUT_WEIGHTS["mlx-audio"])) == ["model.safetensors"]


# Equal arrays as stored (bf16); the ids in float32 (MLX's CPU bf16 quantized matmul takes
# ten times as long): the folder loaded with dtype=float32 against the native model's arrays
# cast to float32 (equal again; quantizing float32 weights instead would give other scales).
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_loads_as_the_native_checkpoint(theirs, wide, audio, bits):
    quantize = None if bits is None else dict.fromkeys(ALL, bits)
    ours = mlx_voxtral.load(theirs[bits], backend="mlx")
    reference = mlx_voxtral.load(wide, backend="mlx", quantize=quantize)
    assert ours.layout == "mlx-audio"
    assert ours.args.quantization == reference.args.quantization
    assert_same_arrays(ours, reference)
    ours = mlx_voxtral.load(theirs[bits], backend="mlx", dtype=mx.float32)
    reference.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                              reference.parameters()))
    assert_same_arrays(ours, reference)
    ids = mlx_voxtral.transcribe(ours, audio).token_ids
    assert len(ids) > 5
    assert ids == mlx_voxtral.transcribe(reference, audio).token_ids


def test_loads_on_the_cpu_backend(theirs, wide, audio):
    require_cpu_backend()
    ours = mlx_voxtral.load(theirs[4], backend="cpu")
    reference = mlx_voxtral.load(wide, backend="cpu", quantize=dict.fromkeys(ALL, 4))
    assert mlx_voxtral.transcribe(ours, audio).token_ids == mlx_voxtral.transcribe(reference, audio).token_ids


def _rewrite(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    rewrite_tensors(dst / "model.safetensors", change)
    return dst


def test_loud_errors_name_the_tensor(theirs, tmp_path):
    """Bad tensors are named as mlx-audio's files spell them."""
    missing = _rewrite(theirs[4], tmp_path / "missing",
                       lambda w: w.pop("encoder.transformer_layers.1.feed_forward_w2.bias"))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: encoder\.transformer_layers\.1\.feed_forward_w2\.bias"):
        mlx_voxtral.load(missing, backend="mlx")
    unknown = _rewrite(theirs[4], tmp_path / "unknown",
                       lambda w: w.__setitem__("encoder.transformer_layers.0.extra.weight", mx.zeros((4,))))
    with pytest.raises(CheckpointError, match=r"unused checkpoint tensors: encoder\.transformer_layers\.0\.extra\.weight"):
        mlx_voxtral.load(unknown, backend="mlx")
    misshaped = _rewrite(theirs[4], tmp_path / "misshaped",
                         lambda w: w.__setitem__("decoder.norm.weight", mx.ones((7,), mx.bfloat16)))
    with pytest.raises(CheckpointError, match=r"decoder\.norm\.weight: checkpoint \(7,\) vs model \(3072,\)"):
        mlx_voxtral.load(misshaped, backend="mlx")


def test_missing_tokenizer_is_named(theirs, tmp_path):
    folder = shutil.copytree(theirs[None], tmp_path / "no_tekken", ignore=shutil.ignore_patterns("tekken.json"))
    with pytest.raises(CheckpointError, match=r"no tekken\.json.*mlx-audio layout"):
        mlx_voxtral.load(folder, backend="mlx")


def test_config_errors(theirs, tmp_path):
    mixed = shutil.copytree(theirs[4], tmp_path / "mixed")
    config = json.loads((mixed / "config.json").read_text())
    config["quantization"]["decoder.layers.0.attention.wq"] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    (mixed / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mixes the modes affine, mxfp4"):
        mlx_voxtral.load(mixed, backend="mlx")
    offline = shutil.copytree(theirs[None], tmp_path / "offline")
    config = json.loads((offline / "config.json").read_text())
    config["decoder"]["ada_rms_norm_t_cond"] = False
    (offline / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="offline Voxtral decoder"):
        mlx_voxtral.load(offline, backend="mlx")


class _Recorder:
    """Stands in for mlx-audio's tokenizer and keeps the ids its ``generate`` decodes (its
    output has text only): every generated id, the final EOS dropped."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, None

    def decode(self, ids):
        self.ids = [int(i) for i in ids]
        return self.tokenizer.decode(ids)


def mlx_audio_ids(folder: Path, audio: np.ndarray) -> list[int]:
    from mlx_audio.stt.utils import load_model

    model = load_model(folder)
    model._tokenizer = recorder = _Recorder(model._tokenizer)
    model.generate(audio, temperature=0.0)  # its config's transcription_delay_ms: ours, written there
    return recorder.ids


# float32 folders: mlx-audio computes in float32 whatever its weights' dtype (its float32 mel
# promotes every matmul), this package in the weights' dtype; in bf16 the two differ in
# rounding and so, on this random model, in some ids. In float32 they agree exactly.
@pytest.mark.parametrize("bits", [None, 4])
def test_converted_folder_runs_in_mlx_audio(wide, tmp_path, audio, monkeypatch, bits):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    if bits is None:
        convert(wide, out, layout="mlx-audio", dtype="float32", show_progress=False)
    else:  # through the CLI
        main(["--model", str(wide), "--out", str(out), "--bits", str(bits), "--layout", "mlx-audio",
              "--dtype", "float32"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "voxtral_realtime" and config["decoder"]["dim"] == 3072
    assert not (out / "params.json").exists()
    if bits is not None:  # the measured policy: the adapter at 8 bits, an entry per layer
        assert config["quantization"] == {
            "group_size": 64, "bits": 4, "mode": "affine",
            "encoder.audio_language_projection_0": {"group_size": 64, "bits": 8, "mode": "affine"},
            "encoder.audio_language_projection_2": {"group_size": 64, "bits": 8, "mode": "affine"},
        }
    ours = mlx_voxtral.load(out, backend="mlx")
    assert ours.layout == "mlx-audio"
    assert_same_arrays(ours, mlx_voxtral.load(wide, backend="mlx", dtype=mx.float32, quantize=bits))
    ids = mlx_voxtral.transcribe(ours, audio).token_ids
    assert len(ids) > 5
    assert mlx_audio_ids(out, audio) == ids


def test_convert_refuses_what_mlx_audio_cannot_build(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"decoder dim 128 \(mlx-audio's is always 3072\)"):
        convert(tiny_checkpoint, tmp_path / "out", layout="mlx-audio", show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidRequestError, match="layout must be one of"):
        convert(tiny_checkpoint, tmp_path / "out", layout="mlx_audio", show_progress=False)
