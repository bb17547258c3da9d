"""Other projects' MLX checkpoint layouts: folders made by their own converters load here as
the native checkpoint does, and folders ``convert --layout X`` writes load and transcribe in X."""

from __future__ import annotations

import json
import pathlib
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_voxtral
from mlx_voxtral import CheckpointError, InvalidRequestError
from mlx_voxtral.convert import convert
from mlx_voxtral.convert import main as convert_main
from mlx_voxtral.quantize import every_layer, quantized_layers

from conftest import require_cpu_backend, rewrite_tensors

# ---------------------------------------------------------------------------------- voxmlx

voxmlx = pytest.importorskip("voxmlx")
import voxmlx.convert  # noqa: E402
from voxmlx.generate import generate as voxmlx_generate  # noqa: E402
from voxmlx.weights import load_model as voxmlx_load_model  # noqa: E402

GROUP = 64  # voxmlx's default group size
VOXMLX_BITS = (None, 4, 6)  # float, 4-bit, and 6-bit (what voxmlx loads by default: the community's 6-bit repo)


@pytest.fixture(scope="module")
def speech_1s(speech_5s, tmp_path_factory) -> pathlib.Path:
    """The first second of the espeak speech as a 16 kHz wav: voxmlx resamples other rates its own way."""
    import soundfile as sf

    path = tmp_path_factory.mktemp("vox_audio") / "speech_1s.wav"
    sf.write(path, mlx_voxtral.load_audio(speech_5s)[:16000], 16000)
    return path


def make_voxmlx(src: pathlib.Path, dst: pathlib.Path, bits=None, dtype=None) -> pathlib.Path:
    """A voxmlx folder written by voxmlx 0.0.2's own converter."""
    # voxmlx 0.0.2's convert passes its source through download_model, which only takes Hub ids
    # (snapshot_download); a local folder is used as is once that step is the identity.
    mp = pytest.MonkeyPatch()
    mp.setattr(voxmlx.convert, "download_model", pathlib.Path)
    try:
        voxmlx.convert.convert(str(src), str(dst), quantize=bits is not None, q_bits=bits or 4, q_group_size=GROUP,
                               dtype=dtype)
    finally:
        mp.undo()
    return dst


@pytest.fixture(scope="module")
def voxmlx_folders(tiny_checkpoint, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("voxmlx")
    return {bits: make_voxmlx(tiny_checkpoint, root / f"q{bits}", bits) for bits in VOXMLX_BITS}


def native_as_voxmlx(checkpoint, bits, backend="mlx", dtype=None):
    """The native checkpoint loaded here, quantized (``bits``) with the selection voxmlx uses:
    every Linear/Embedding whose input size the group size divides, at one width."""
    model = mlx_voxtral.load(checkpoint, backend="mlx", dtype=dtype)
    if bits is not None:
        nn.quantize(model, class_predicate=every_layer(bits, GROUP))
        mx.eval(model.parameters())
    return model


def assert_same_model(ours, reference):
    """Same modules (quantized alike) and array-equal parameters of equal dtypes."""
    assert quantized_layers(ours) == quantized_layers(reference)
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(reference.parameters()))
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not mx.array_equal(a[k], b[k])]
    assert not unequal, unequal


@pytest.mark.parametrize("bits", VOXMLX_BITS, ids=lambda b: "float" if b is None else f"{b}bit")
def test_voxmlx_folder_loads_as_the_native_checkpoint(voxmlx_folders, tiny_checkpoint, speech_1s, bits):
    """A folder from voxmlx's converter loads (layout told by its files) as the native
    checkpoint quantized with voxmlx's selection: equal arrays, equal greedy ids."""
    model = mlx_voxtral.load(voxmlx_folders[bits], backend="mlx")
    assert model.layout == "voxmlx"
    reference = native_as_voxmlx(tiny_checkpoint, bits)
    assert_same_model(model, reference)
    if bits is not None:
        assert len(quantized_layers(model)) > 0
        assert {q["bits"] for q in quantized_layers(model).values()} == {bits}
        # voxmlx quantizes the ada-norm down projection too: kept as stored
        assert "decoder.layers.0.ada_down" in quantized_layers(model)
    if bits is not None:  # equal models alike in float32: MLX's bf16 quantized matmuls are slow on the CPU
        for m in (model, reference):
            m.set_dtype(mx.float32)
    audio = mlx_voxtral.load_audio(speech_1s)
    ids = mlx_voxtral.transcribe(model, audio).token_ids
    assert len(ids) > 10
    assert ids == mlx_voxtral.transcribe(reference, audio).token_ids


def test_voxmlx_float_folder_on_the_cpu_backend(voxmlx_folders, tiny_checkpoint, speech_1s):
    require_cpu_backend()
    audio = mlx_voxtral.load_audio(speech_1s)
    ids = mlx_voxtral.transcribe(mlx_voxtral.load(voxmlx_folders[None], backend="cpu"), audio).token_ids
    assert ids == mlx_voxtral.transcribe(mlx_voxtral.load(tiny_checkpoint, backend="cpu"), audio).token_ids


def broken(folder: pathlib.Path, tmp_path, edit) -> pathlib.Path:
    """A copy of ``folder`` whose weights ``edit(weights)`` changed."""
    out = tmp_path / "broken"
    out.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).symlink_to(f)
    rewrite_tensors(folder / "model.safetensors", edit, out / "model.safetensors")
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("language_model.layers.1.ffn_norm.weight"),
     "1 parameters not in the checkpoint: language_model.layers.1.ffn_norm.weight"),
    (lambda w: w.__setitem__("encoder.norm.weight", mx.zeros((7,))),
     "encoder.norm.weight: checkpoint (7,) vs model (128,)"),
    (lambda w: w.__setitem__("language_model.lm_head.weight", mx.zeros((7,))),
     "1 unused checkpoint tensors: language_model.lm_head.weight"),
    (lambda w: w.__setitem__("encoder.layers.0.attention.wq.weight", w.pop("encoder.layers.0.attention.q_proj.weight")),
     "not under its names: encoder.layers.0.attention.wq.weight"),
], ids=["missing", "misshaped", "unknown", "our-spelling"])
def test_voxmlx_folder_tensor_errors_name_the_stored_tensor(voxmlx_folders, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mlx_voxtral.load(broken(voxmlx_folders[None], tmp_path, edit), backend="mlx")


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.__setitem__("language_model.layers.0.mlp.up_proj.scales", mx.zeros((256, 3), mx.bfloat16)),
     "language_model.layers.0.mlp.up_proj is stored quantized in shapes no affine setting has: group_size must be "
     "32, 64 or 128, got 42"),
    (lambda w: w.__setitem__("adapter.w_in.weight", mx.zeros((128, 512 * 7 // 32), mx.uint32)),
     "adapter.w_in is stored quantized in shapes no affine setting has: quantization bits for the adapter must be "
     "2, 3, 4, 5, 6 or 8, got 7"),
    (lambda w: w.pop("language_model.layers.0.mlp.up_proj.biases"),
     "language_model.layers.0.mlp.up_proj is stored affine-quantized without its biases"),
], ids=["group-size", "bits", "no-biases"])
def test_voxmlx_quantized_layer_in_no_mlx_setting(voxmlx_folders, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        mlx_voxtral.load(broken(voxmlx_folders[4], tmp_path, edit), backend="mlx")


def test_voxmlx_folder_without_tekken(voxmlx_folders, tmp_path):
    folder = tmp_path / "no_tekken"
    shutil.copytree(voxmlx_folders[None], folder)
    (folder / "tekken.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tekken.json: the tokenizer \(voxmlx layout"):
        mlx_voxtral.load(folder, backend="mlx")


# convert --layout voxmlx ---------------------------------------------------------------------
# Across implementations the folders are float32: the tiny random model's top-2 logits are often
# a bf16 ulp apart (0.0156), and voxmlx's bf16 arithmetic order differs from this package's, so
# bf16 ids are a coin toss there; in float32 the two agree at every step.

def voxmlx_ids(folder: pathlib.Path, wav: pathlib.Path) -> list[int]:
    """Greedy ids from voxmlx 0.0.2's own loading and decoding (its ``transcribe`` less the
    detokenizing): prompt of BOS + 38 [STREAMING_PAD] (32 left pad, 6 delay = 480 ms, this
    package's default delay too)."""
    model, _ = voxmlx_load_model(folder)
    sp = voxmlx._load_tokenizer(folder)
    prompt, n_delay = voxmlx._build_prompt_tokens(sp)
    return voxmlx_generate(model, str(wav), prompt, n_delay_tokens=n_delay, eos_token_id=sp.eos_id)


@pytest.fixture(scope="module")
def written_voxmlx(tiny_checkpoint, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("to_voxmlx")
    return {bits: convert(tiny_checkpoint, root / f"q{bits}", bits=bits, dtype="float32", layout="voxmlx",
                          show_progress=False)
            for bits in (None, 4)}


@pytest.mark.parametrize("bits", (None, 4), ids=("float", "4bit"))
def test_convert_layout_voxmlx_transcribes_alike_in_voxmlx(written_voxmlx, tiny_checkpoint, speech_1s, bits):
    folder = written_voxmlx[bits]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model-00001-of-00001.safetensors",
                                                  "model.safetensors.index.json", "tekken.json", "README.md"}
    native = json.loads((tiny_checkpoint / "params.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config == {**native, **({} if bits is None else {"quantization": {"group_size": GROUP, "bits": bits}})}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "language_model.layers.0.ada_norm.linear_in.weight" in index["weight_map"]

    theirs = voxmlx_ids(folder, speech_1s)
    ours = mlx_voxtral.load(folder, backend="mlx")
    assert ours.layout == "voxmlx"
    reference = native_as_voxmlx(tiny_checkpoint, bits, dtype="float32")
    assert_same_model(ours, reference)
    audio = mlx_voxtral.load_audio(speech_1s)
    ids = mlx_voxtral.transcribe(ours, audio).token_ids
    assert ids == mlx_voxtral.transcribe(reference, audio).token_ids
    # voxmlx's generate returns the tokens it feeds back, at positions prefix..N_audio-1: the
    # prediction made at the last audio position is never returned; this package returns it
    # too (no EOS here, where voxmlx would stop as well).
    assert len(theirs) > 10 and 2 not in ids
    assert ids[:-1] == theirs and len(ids) == len(theirs) + 1


def test_convert_layout_voxmlx_cli(tiny_checkpoint, tmp_path, capsys):
    """``python -m mlx_voxtral.convert --layout voxmlx`` and ``mlx-voxtral convert`` (which hands
    its flags to the same main) write a folder voxmlx loads, array-equal to the API's."""
    from mlx_voxtral.cli import main as cli_main

    convert_main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "a"), "--layout", "voxmlx", "--bits", "4"])
    assert cli_main(["convert", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "b"),
                     "--layout", "voxmlx", "--bits", "4"]) == 0
    a, _ = voxmlx_load_model(tmp_path / "a")
    b, _ = voxmlx_load_model(tmp_path / "b")
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(wa) == sorted(wb) and all(mx.array_equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}
    with pytest.raises(SystemExit) as e:
        convert_main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "c"), "--layout", "voxmlx",
                      "--bits", "4", "--adapter-bits", "8"])
    assert e.value.code == 2
    assert "not per-part bits" in capsys.readouterr().err


def test_voxmlx_converter_and_convert_layout_voxmlx_agree(voxmlx_folders, tiny_checkpoint, tmp_path):
    """Same source, same bits: voxmlx's converter and ``convert --layout voxmlx`` store the same tensors."""
    ours = convert(tiny_checkpoint, tmp_path / "ours", bits=4, layout="voxmlx", show_progress=False)
    a = dict(mx.load(str(ours / "model-00001-of-00001.safetensors")))
    b = dict(mx.load(str(voxmlx_folders[4] / "model.safetensors")))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": {"decoder": 4, "encoder": 8}}, "not per-part bits"),
    ({"bits": 4, "mode": "mxfp4"}, "affine-quantized only"),
    ({"layout": "mlx-audio-or-so"}, "layout must be one of mlx-voxtral, voxmlx"),
])
def test_convert_layout_voxmlx_rejects_what_voxmlx_cannot_read(tiny_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        convert(tiny_checkpoint, tmp_path / "x", **{"layout": "voxmlx", **kwargs}, show_progress=False)
    assert not (tmp_path / "x").exists()


def test_convert_own_quantized_folder_to_voxmlx_fails_clearly(tiny_checkpoint, tmp_path):
    """This package's 4-bit policy (adapter at 8 bits, ada-norm MLPs full precision) is no
    setting voxmlx can re-create."""
    own = convert(tiny_checkpoint, tmp_path / "own4", bits=4, show_progress=False)
    with pytest.raises(CheckpointError, match=r"voxmlx 0.0.2 cannot read .*adapter.w_in: 8-bit group 64, not 4-bit"):
        convert(own, tmp_path / "x", layout="voxmlx", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_resave_quantized_voxmlx_folder(voxmlx_folders, tmp_path):
    """A quantized voxmlx folder re-saved: in voxmlx's layout it is the same folder again; in
    this package's layout it is refused (its parts policy keeps the ada-norm MLPs in full
    precision, so the loader could not read the stored ones back), naming the layers."""
    again = convert(voxmlx_folders[4], tmp_path / "again", layout="voxmlx", show_progress=False)
    assert json.loads((again / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}
    a = dict(mx.load(str(again / "model-00001-of-00001.safetensors")))
    b = dict(mx.load(str(voxmlx_folders[4] / "model.safetensors")))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match=r"cannot record \(2: decoder.layers.0.ada_down: 4-bit group 64, "
                                              r"not full precision"):
        convert(voxmlx_folders[4], tmp_path / "own", show_progress=False)
    assert not (tmp_path / "own").exists()
    with pytest.raises(CheckpointError, match=r"already quantized \(4-bit, group size 64\)"):
        convert(voxmlx_folders[4], tmp_path / "own", bits=8, show_progress=False)


def test_resave_float_voxmlx_folder_in_own_layout(voxmlx_folders, tiny_checkpoint, tmp_path):
    own = convert(voxmlx_folders[None], tmp_path / "own", show_progress=False)
    assert (own / "params.json").exists()
    model = mlx_voxtral.load(own, backend="mlx")
    assert model.layout == "mlx-voxtral"
    assert_same_model(model, mlx_voxtral.load(tiny_checkpoint, backend="mlx"))
    assert json.loads((own / "params.json").read_text()) == json.loads((tiny_checkpoint / "params.json").read_text())
