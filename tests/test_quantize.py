"""Quantization: policy, accuracy against float32, convert -> load, typed errors, CLI."""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_voxtral
from mlx_voxtral import CheckpointError, InvalidRequestError, VoxtralError
from mlx_voxtral.audio import load_audio, log_mel_spectrogram
from mlx_voxtral.quantize import quantization_config

# the package exports a function named like the module: fetch the module itself
convert_module = importlib.import_module("mlx_voxtral.convert")

THRESHOLD = {8: 0.99, 4: 0.95}  # cosine similarity with float32, group size 64


def _trace(model, audio: np.ndarray, tokens: list[int]) -> dict[str, np.ndarray]:
    """The encoder and adapter outputs and the logits, with the decoder fed the prompt then
    ``tokens`` (teacher forcing); on the plain MLX modules also every layer's output."""
    tok = model.tokenizer
    plain = model.backend == "mlx"
    mel = log_mel_spectrogram(tok.pad_audio(audio)).astype(model.dtype)
    cache = model.make_cache(tok.max_prompt_length)
    cache.add_row()
    rows = slice(0, 1)
    out: dict[str, list] = {}

    def keep(name, x):  # [1, T, D] per encoder chunk / decoder step, or [1, vocab] logits
        out.setdefault(name, []).append(x[0] if x.ndim == 3 else x)

    step = model.encode_tokens * model.mel_frames_per_token
    for start in range(0, mel.shape[0], step):
        chunk = mel[None, start : start + step]
        cache.encoder.prepare(rows, [chunk.shape[1]], chunk.shape[1])
        if plain:
            x = chunk
            for conv, c in zip(model.encoder.conv_layers, cache.encoder.conv):
                x = nn.gelu(conv(x, c))
            for i, (layer, c) in enumerate(zip(model.encoder.layers, cache.encoder)):
                x = layer(x, cache.encoder.mask, c)
                keep(f"encoder.layers.{i}", x)
            x = model.encoder.norm(x)
        else:
            x = model.encoder(chunk, cache.encoder)
        cache.encoder.finalize()
        keep("encoder", x)
        keep("adapter", model.adapter(x))
    embeds = mx.concatenate(out["adapter"])
    prompt = tok.prompt()
    d = tok.num_delay_tokens()
    feeds = [(embeds[: len(prompt)], prompt)] + [
        (embeds[p : p + 1], [t]) for p, t in enumerate(tokens[:-1], start=len(prompt))
    ]
    for e, ids in feeds:
        n = len(ids)
        if plain:
            cache.decoder.prepare(rows, [n], n)
            h = e[None].astype(model.dtype) + model.decoder.tok_embeddings(mx.array([ids]))
            for i, (layer, scale, c) in enumerate(zip(model.decoder.layers, model.ada_scales([d]), cache.decoder)):
                h = layer(h, scale, cache.decoder.mask, c)
                keep(f"decoder.layers.{i}", h[:, -1:])
            cache.decoder.finalize()
            keep("logits", model.decoder.tok_embeddings.as_linear(model.decoder.norm(h[:, -1])))
        else:
            keep("logits", model(e[None], mx.array([ids]), cache, rows, [n], [d]))
    return {k: np.array(mx.concatenate(v).astype(mx.float32), np.float64) for k, v in out.items()}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def audio(speech_5s) -> np.ndarray:
    return load_audio(speech_5s)


@pytest.fixture(scope="module")
def baseline(model_fp32, audio):
    return mlx_voxtral.transcribe(model_fp32, audio)


@pytest.fixture(scope="module")
def float_trace(tiny_checkpoint, audio, baseline):
    """The float32 reference on the plain MLX modules (every layer)."""
    return _trace(mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32, backend="mlx"), audio, baseline.token_ids)


@pytest.fixture(scope="module")
def default_quantized(tiny_checkpoint):
    """The default backend's quantized models."""
    return {bits: mlx_voxtral.load(tiny_checkpoint, quantize=bits) for bits in (8, 4)}


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted to 4 bits, in several small shards."""
    out = tmp_path_factory.mktemp("converted") / "tiny-4bit"
    return mlx_voxtral.convert(
        tiny_checkpoint, out, bits=4, max_shard_bytes=4 << 20, show_progress=False
    )


def test_policy_keeps_sensitive_layers_in_full_precision(quantized, backend):
    model = quantized[4]
    dec, enc = model.decoder.layers[0], model.encoder.layers[0]
    layers = (dec.attention.wq, dec.attention.wk, dec.feed_forward.w2, enc.feed_forward.w2,
              enc.attention.wo, enc.attention.wq, enc.feed_forward.w1)
    for layer in layers:
        assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (4, 64)
    assert isinstance(model.decoder.tok_embeddings, nn.QuantizedEmbedding)  # also the tied LM head
    assert model.decoder.tok_embeddings.bits == 4
    assert model.adapter.w_in.bits == model.adapter.w_out.bits == 8  # measured: sensitive
    assert isinstance(dec.ada_down, nn.Linear) and isinstance(dec.ada_up, nn.Linear)  # not quantized
    assert "bias" in enc.attention.wo
    params = dict(tree_flatten(model.parameters()))
    if backend == "cpu":
        # the CPU backend's policy: matmul weights that stay unquantized and the scales/biases
        # of quantized ones keep the checkpoint's bf16; everything else is float32, so
        # activations are float32
        for name, p in params.items():
            if name.endswith((".scales", ".biases")) or name.endswith(("ada_down.weight", "ada_up.weight")):
                assert p.dtype == mx.bfloat16, name
            elif p.dtype != mx.uint32:
                assert p.dtype == mx.float32, name
        assert model.dtype == mx.float32
    else:
        # the plain MLX modules (a Mac): every floating parameter stays in the checkpoint's bf16
        assert {p.dtype for p in params.values()} == {mx.bfloat16, mx.uint32}
        assert model.dtype == mx.bfloat16
    assert model.args.quantization == quantization_config(4, 64)

    gs32 = mlx_voxtral.load(model.path, quantize=8, group_size=32, backend=backend)
    assert isinstance(gs32.encoder.layers[0].attention.wq, nn.QuantizedLinear)
    assert gs32.encoder.layers[0].attention.wq.group_size == 32
    assert isinstance(gs32.decoder.layers[0].ada_down, nn.Linear)
    # wo's input (4 heads x 48 = 192) is not a multiple of 128: skipped, not an error
    gs128 = mlx_voxtral.load(model.path, quantize=8, group_size=128, backend=backend)
    assert isinstance(gs128.decoder.layers[0].attention.wo, nn.Linear)
    assert isinstance(gs128.decoder.layers[0].attention.wq, nn.QuantizedLinear)


@pytest.mark.parametrize("bits", [8, 4])
def test_cosine_similarity_with_float32(bits, quantized, backend, float_trace, baseline, audio, capsys):
    """Per-layer outputs (on the plain MLX modules) and final logits of the quantized model
    stay close to float32."""
    model = quantized[bits]
    ours = _trace(model, audio, baseline.token_ids)
    cosines = {name: _cos(ours[name], float_trace[name]) for name in ours}
    forced = float((ours["logits"].argmax(-1) == float_trace["logits"].argmax(-1)).mean())
    free = mlx_voxtral.transcribe(model, audio).token_ids
    agree = sum(a == b for a, b in zip(free, baseline.token_ids)) / len(baseline.token_ids)
    with capsys.disabled():
        print(f"\n[{backend}] {bits}-bit, group size 64, vs float32 on 5 s of speech:")
        for name, c in cosines.items():
            print(f"  cosine {name:18s} {c:.5f}")
        print(f"  greedy-token agreement: teacher-forced {forced:.1%}, free-running {agree:.1%} "
              f"({len(baseline.token_ids)} tokens)")
    assert min(cosines.values()) >= THRESHOLD[bits]
    assert cosines["logits"] < 1.0  # something was quantized
    if bits == 8:
        assert forced >= 0.8


def test_mixed_setting_loads_and_transcribes(tiny_checkpoint, baseline, audio, float_trace):
    model = mlx_voxtral.load(tiny_checkpoint, quantize={"decoder": 4, "encoder": 8}, group_size=32)
    assert model.decoder.layers[1].feed_forward.w1.bits == 4
    assert model.encoder.layers[1].attention.wq.bits == 8
    # parts not named stay full precision
    assert isinstance(model.decoder.tok_embeddings, nn.Embedding)
    assert isinstance(model.adapter.w_in, nn.Linear)
    parts = {"decoder": 4, "encoder": 8, "embedding": None, "adapter": None}
    assert model.args.quantization["parts"] == parts
    assert _cos(_trace(model, audio, baseline.token_ids)["logits"], float_trace["logits"]) >= 0.95
    r = mlx_voxtral.transcribe(model, audio)
    assert r.finish_reason == "end_of_audio"
    assert len(r.token_ids) == len(baseline.token_ids)
    assert r.text == model.tokenizer.decode(r.token_ids).strip()


def test_transcribe_quantized(quantized, baseline, speech_5s):
    for bits, model in quantized.items():
        r = mlx_voxtral.transcribe(model, speech_5s)
        assert r.finish_reason == "end_of_audio"
        assert len(r.token_ids) == len(baseline.token_ids)
        assert r.text == model.tokenizer.decode(r.token_ids).strip()
        assert r.token_ids != baseline.token_ids or bits == 8


def test_converted_folder_layout(converted, tiny_checkpoint):
    files = sorted(p.name for p in converted.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"params.json", "tekken.json", "README.md", "model.safetensors.index.json"} <= set(files)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        tensors = mx.load(str(converted / shard))
        assert all(index["weight_map"][name] == shard for name in tensors)
        stored.update(tensors)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in stored.values())
    assert stored["decoder.layers.0.attention.wq.weight"].dtype == mx.uint32
    assert stored["decoder.norm.weight"].dtype == mx.bfloat16  # the source's dtype
    params = json.loads((converted / "params.json").read_text())
    source = json.loads((tiny_checkpoint / "params.json").read_text())
    assert params.pop("quantization") == {
        "group_size": 64, "bits": 4, "mode": "affine",
        "parts": {"decoder": 4, "encoder": 4, "embedding": 4, "adapter": 8},
    }
    assert params == source
    tekken = (converted / "tekken.json").read_bytes()
    assert tekken == (tiny_checkpoint / "tekken.json").read_bytes()
    card = (converted / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n")
    assert "base_model: mistralai/Voxtral-Mini-4B-Realtime-2602" in card
    assert "- 4-bit" in card and 'mlx_voxtral.load("tiny-4bit")' in card


def test_convert_then_load_is_bit_identical_to_in_situ(converted, quantized, backend, audio, baseline):
    loaded = mlx_voxtral.load(converted, backend=backend)
    in_situ = quantized[4]
    a, b = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(in_situ.parameters()))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name
    audio = audio[:32000]  # the same arrays in the same modules: 2 s show the same ids
    r = mlx_voxtral.transcribe(loaded, audio)
    assert r.token_ids == mlx_voxtral.transcribe(in_situ, audio).token_ids
    assert r.finish_reason == "end_of_audio"
    assert r.text == loaded.tokenizer.decode(r.token_ids).strip()


def test_loading_converted_folder_does_not_requantize(converted, default_quantized, monkeypatch):
    """With ``mx.quantize`` producing wrong values, loading a converted folder still gives
    exactly the stored tensors (while in-situ quantization visibly changes)."""
    real = mx.quantize

    def wrong_quantize(w, *args, **kwargs):
        return real(mx.zeros_like(w), *args, **kwargs)

    monkeypatch.setattr(mx, "quantize", wrong_quantize)
    loaded = dict(tree_flatten(mlx_voxtral.load(converted).parameters()))
    reference = dict(tree_flatten(default_quantized[4].parameters()))
    assert all(mx.array_equal(loaded[k], reference[k]).item() for k in reference)
    in_situ = dict(tree_flatten(mlx_voxtral.load(default_quantized[4].path, quantize=4).parameters()))
    name = "decoder.layers.0.attention.wq.scales"
    assert not mx.array_equal(in_situ[name], reference[name]).item()


def test_unquantized_convert_round_trips(tiny_checkpoint, model_fp32, tmp_path, audio, baseline):
    out = mlx_voxtral.convert(
        tiny_checkpoint, tmp_path / "fp32", dtype="float32", show_progress=False
    )
    params = json.loads((out / "params.json").read_text())
    assert "quantization" not in params
    model = mlx_voxtral.load(out)
    assert model.args.quantization is None and model.dtype == mx.float32
    assert "- 4-bit" not in (out / "README.md").read_text()
    ours = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(v, ours[k]).item() for k, v in tree_flatten(model_fp32.parameters()))
    assert mlx_voxtral.transcribe(model, audio).token_ids == baseline.token_ids
    # a converted folder can be re-saved (not re-quantized)
    again = mlx_voxtral.convert(out, tmp_path / "again", show_progress=False)
    assert mlx_voxtral.load(again).dtype == mx.float32


# (mode, bits) -> floor of the logit cosine with float32 on the tiny checkpoint (plain MLX
# modules, the mode's default group size, 2 s of speech): measured values less a margin, rising
# with the bits; 4/8-bit affine are test_cosine_similarity_with_float32's
WIDTHS = {
    ("affine", 2): 0.05, ("affine", 3): 0.55, ("affine", 5): 0.97, ("affine", 6): 0.985,
    ("mxfp4", 4): 0.85, ("nvfp4", 4): 0.85, ("mxfp8", 8): 0.98,
}
SHORT = 32000  # samples (2 s): the width tests trace this much
SHORT_TOKENS = 12  # teacher-forced tokens after the prompt


@pytest.fixture(scope="module")
def short_float_trace(tiny_checkpoint, audio, baseline):
    """The float32 reference of the width tests (plain MLX modules, every layer, 2 s)."""
    model = mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32, backend="mlx")
    return _trace(model, audio[:SHORT], baseline.token_ids[:SHORT_TOKENS])


@pytest.mark.parametrize("mode, bits", list(WIDTHS))
def test_cosine_per_width_and_mode(mode, bits, tiny_checkpoint, short_float_trace, baseline, audio, capsys):
    """Every other width and mode MLX has: per-layer and logit cosine with float32, printed,
    the logits' above a floor that rises with the bits."""
    model = mlx_voxtral.load(tiny_checkpoint, quantize=bits, mode=mode, backend="mlx")
    config = model.args.quantization
    assert (config["mode"], config["bits"]) == (mode, bits)
    wq = model.decoder.layers[0].attention.wq
    assert isinstance(wq, nn.QuantizedLinear) and (wq.mode, wq.bits, wq.group_size) == (mode, bits, config["group_size"])
    ours = _trace(model, audio[:SHORT], baseline.token_ids[:SHORT_TOKENS])
    ref = short_float_trace
    cosines = {name: _cos(ours[name], ref[name]) for name in ours}
    forced = float((ours["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean())
    with capsys.disabled():
        print(f"\n[mlx] {bits}-bit {mode}, group size {config['group_size']}, vs float32 on 2 s of speech:")
        for name, c in cosines.items():
            print(f"  cosine {name:18s} {c:.5f}")
        print(f"  greedy-token agreement: teacher-forced {forced:.1%}")
    assert WIDTHS[mode, bits] <= cosines["logits"] < 1.0


def test_adapter_policy_at_low_widths_and_fp_modes():
    assert quantization_config(2)["parts"] == {"decoder": 2, "encoder": 2, "embedding": 2, "adapter": 8}
    assert quantization_config(8, mode="mxfp8")["parts"]["adapter"] == 8
    for mode in ("mxfp4", "nvfp4"):  # no 8 bits in the mode: the adapter stays full precision
        config = quantization_config(4, mode=mode)
        assert config["parts"] == {"decoder": 4, "encoder": 4, "embedding": 4, "adapter": None}
        assert config["group_size"] == {"mxfp4": 32, "nvfp4": 16}[mode]
    assert quantization_config(4) == quantization_config(4, 64, "affine")  # unchanged default


@pytest.mark.parametrize("bits, mode", [(3, "affine"), (6, "affine"), (4, "nvfp4")])
def test_convert_round_trips_width_and_mode(bits, mode, tiny_checkpoint, tmp_path, audio):
    """The stored block of a folder converted at ``bits``/``mode`` loads back as that setting,
    with the in-situ model's arrays (and, at 3 bits, its greedy ids: the same arrays give the
    same ids, so one width shows it)."""
    out = mlx_voxtral.convert(tiny_checkpoint, tmp_path / "q", bits=bits, mode=mode, show_progress=False)
    stored = json.loads((out / "params.json").read_text())["quantization"]
    assert stored == quantization_config(bits, mode=mode)
    loaded = mlx_voxtral.load(out, backend="mlx")
    in_situ = mlx_voxtral.load(tiny_checkpoint, quantize=bits, mode=mode, backend="mlx")
    assert loaded.args.quantization == in_situ.args.quantization == stored
    a, b = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(in_situ.parameters()))
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)
    if bits != 3:
        return
    audio = audio[:16000]
    assert mlx_voxtral.transcribe(loaded, audio).token_ids == mlx_voxtral.transcribe(in_situ, audio).token_ids


@pytest.mark.parametrize("bits, mode", [(3, "affine"), (4, "mxfp4")])
def test_cpu_backend_falls_back_to_mlx_with_one_warning(bits, mode, tiny_checkpoint, model_fp32, audio, baseline):
    """Widths and modes the native kernels do not run: one warning at load, and the CPU
    backend's logits still match the plain MLX modules' (same quantized weights)."""
    if not mlx_voxtral.cpu.available():
        pytest.skip(mlx_voxtral.cpu.unavailable_reason())
    with pytest.warns(RuntimeWarning) as caught:
        cpu = mlx_voxtral.load(tiny_checkpoint, quantize=bits, mode=mode, backend="cpu")
    messages = [str(w.message) for w in caught if "native kernels" in str(w.message)]
    assert len(messages) == 1
    assert f"{bits}-bit {mode}" in messages[0] and "multiplied by MLX" in messages[0]
    assert mlx_voxtral.cpu.mlx_fallback_layers(cpu)
    plain = mlx_voxtral.load(tiny_checkpoint, quantize=bits, mode=mode, backend="mlx", dtype="float32")
    audio, ids = audio[:SHORT], baseline.token_ids[:SHORT_TOKENS]
    got, want = _trace(cpu, audio, ids)["logits"], _trace(plain, audio, ids)["logits"]
    assert _cos(got, want) > 0.999
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.9


def test_cpu_backend_runs_4_and_8_bit_affine_natively(quantized, backend):
    if backend != "cpu":
        pytest.skip("the CPU backend's kernels")
    for bits in (4, 8):
        assert mlx_voxtral.cpu.mlx_fallback_layers(quantized[bits]) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantize": 1}, "quantization bits must be 2, 3, 4, 5, 6 or 8, got 1"),
        ({"quantize": 7}, "quantization bits must be 2, 3, 4, 5, 6 or 8, got 7"),
        ({"quantize": 16}, "quantization bits must be 2, 3, 4, 5, 6 or 8, got 16"),
        ({"quantize": True}, "quantization bits must be 2, 3, 4, 5, 6 or 8, got True"),
        ({"quantize": 4, "group_size": 7}, "group_size must be 32, 64 or 128, got 7"),
        ({"quantize": {"encoder": 7}}, "bits for the encoder must be 2, 3, 4, 5, 6 or 8, got 7"),
        ({"quantize": 4, "mode": "int4"}, "quantization mode must be one of affine, mxfp4, mxfp8, nvfp4, got 'int4'"),
        ({"mode": "fp4"}, "quantization mode must be one of"),
        ({"quantize": 8, "mode": "mxfp4"}, "quantization bits must be 4 in mode mxfp4, got 8"),
        ({"quantize": 4, "mode": "mxfp8"}, "quantization bits must be 8 in mode mxfp8, got 4"),
        ({"quantize": 4, "mode": "nvfp4", "group_size": 64}, "group_size must be 16 in mode nvfp4, got 64"),
        ({"quantize": {"adapter": 8}, "mode": "nvfp4"}, "bits for the adapter must be 4 in mode nvfp4, got 8"),
        ({"quantize": {"lm_head": 4}}, "unknown quantization part.*'lm_head'.*expected decoder"),
    ],
)
def test_bad_settings_are_typed_errors(tiny_checkpoint, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        mlx_voxtral.load(tiny_checkpoint, **kwargs)


def test_quantizing_a_quantized_folder_fails(converted, tmp_path):
    for bits in (4, 8):
        with pytest.raises(CheckpointError, match="already quantized .4-bit, group size 64"):
            mlx_voxtral.load(converted, quantize=bits)
        with pytest.raises(CheckpointError, match="already quantized"):
            mlx_voxtral.convert(converted, tmp_path / "twice", bits=bits, show_progress=False)
    assert not (tmp_path / "twice").exists()


def test_convert_argument_errors(tiny_checkpoint, converted, tmp_path):
    with pytest.raises(InvalidRequestError, match="already exists"):
        mlx_voxtral.convert(tiny_checkpoint, converted, bits=4, show_progress=False)
    with pytest.raises(InvalidRequestError, match="dtype must be one of"):
        mlx_voxtral.convert(tiny_checkpoint, tmp_path / "x", dtype="int8", show_progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        mlx_voxtral.convert(tmp_path / "missing", tmp_path / "y", bits=4, show_progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_broken_quantization_block(converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    params = json.loads((broken / "params.json").read_text())
    params["quantization"]["group_size"] = 7
    (broken / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="unreadable quantization block"):
        mlx_voxtral.load(broken)
    params["quantization"]["group_size"] = 64
    for mode, match in (("q4", "mode must be one of"), ("mxfp8", "group_size must be 32 in mode mxfp8")):
        params["quantization"]["mode"] = mode  # a mode unknown, or one the stored layout is not in
        (broken / "params.json").write_text(json.dumps(params))
        with pytest.raises(CheckpointError, match=f"unreadable quantization block.*{match}"):
            mlx_voxtral.load(broken)
    del params["quantization"]
    (broken / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="unused checkpoint tensors.*scales"):
        mlx_voxtral.load(broken)


def test_load_progress(tiny_checkpoint):
    calls = []
    mlx_voxtral.load(tiny_checkpoint, quantize=8, progress=lambda *args: calls.append(args))
    total = calls[-1][1]
    assert calls == [(i, total) for i in range(1, total + 1)]
    # conv stem, 2 encoder layers, encoder norm, adapter w_in and w_out, embedding,
    # 2 decoder layers, decoder norm: one group each
    assert total == 10


def test_in_situ_quantization_holds_no_float_copies(tiny_checkpoint):
    """Between groups, MLX holds only what the model keeps: float weights of layers already
    quantized are gone (the full-size peak figure is benchmarks/bench.py --modes load)."""
    gc.collect()
    before = mx.get_active_memory()
    held = []
    model = mlx_voxtral.load(
        tiny_checkpoint, quantize=4, progress=lambda *_: held.append(mx.get_active_memory() - before)
    )
    final = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    float_embedding = model.args.vocab_size * model.args.dim * 2  # bf16: 3x the final size
    assert float_embedding > 2 * final
    assert max(held) <= final + (1 << 20)


def test_upload_uses_huggingface_hub(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            assert (tmp_path / "up" / "params.json").exists()  # uploaded after writing

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    repo = "me/voxtral-8bit"
    out = mlx_voxtral.convert(
        tiny_checkpoint, tmp_path / "up", bits=8, upload_repo=repo, show_progress=False
    )
    assert [c[:2] for c in calls] == [("create_repo", repo), ("upload_folder", repo)]
    assert calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(out)
    assert 'mlx_voxtral.load("me/voxtral-8bit")' in (out / "README.md").read_text()

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(VoxtralError, match="upload to 'me/x' failed: no network"):
        mlx_voxtral.convert(
            tiny_checkpoint, tmp_path / "up2", bits=8, upload_repo="me/x", show_progress=False
        )


def _run_cli(*args: str):
    command = [sys.executable, "-m", "mlx_voxtral.convert", *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_converts(tiny_checkpoint, tmp_path, speech_5s):
    out = tmp_path / "cli"
    r = _run_cli(
        "--model", str(tiny_checkpoint), "--out", str(out),
        "--bits", "8", "--group-size", "32", "--adapter-bits", "none",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}"
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr
    assert "quantizing" in r.stderr  # the progress bar
    config = json.loads((out / "params.json").read_text())["quantization"]
    assert config["group_size"] == 32
    assert config["parts"] == {"decoder": 8, "encoder": 8, "embedding": 8, "adapter": None}
    model = mlx_voxtral.load(out)
    assert isinstance(model.adapter.w_in, nn.Linear) and model.encoder.layers[0].attention.wq.bits == 8
    assert mlx_voxtral.transcribe(model, speech_5s).finish_reason == "end_of_audio"


def test_cli_errors(tiny_checkpoint, converted, tmp_path, capsys):
    r = _run_cli("--model", str(tiny_checkpoint), "--out", str(tmp_path / "a"), "--bits", "7")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: quantization bits must be 2, 3, 4, 5, 6 or 8, got 7"
    cases = [
        (["--bits", "4", "--group-size", "7"], "error: group_size must be 32, 64 or 128, got 7"),
        (["--encoder-bits", "7"], "error: quantization bits for the encoder must be 2, 3, 4, 5, 6 or 8, got 7"),
        (["--encoder-bits", "x"], "argument --encoder-bits: expected bits (such as 4) or none, got 'x'"),
        (["--bits", "8", "--mode", "nvfp4"], "error: quantization bits must be 4 in mode nvfp4, got 8"),
        (["--bits", "4", "--mode", "q4"], "error: quantization mode must be one of affine, mxfp4, mxfp8, nvfp4"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            convert_module.main(
                ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "b"), *flags]
            )
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_module.main(
            ["--model", str(converted), "--out", str(tmp_path / "c"), "--bits", "4"]
        )
    assert "is already quantized" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("bits, mode", [(4, "mxfp4"), (8, "mxfp8"), (4, "nvfp4")])
@pytest.mark.parametrize("layer", ["linear", "embedding"])
def test_quantizing_by_row_blocks_equals_one_quantize(bits, mode, layer, monkeypatch):
    """In the fp modes a large weight is quantized a block of rows at a time (MLX's CPU
    quantize crashes on the full embedding at once); the arrays equal ``to_quantized``'s."""
    module = nn.Linear(256, 1000) if layer == "linear" else nn.Embedding(1000, 256)
    module.weight = module.weight.astype(mx.bfloat16)
    group_size = quantization_config(bits, mode=mode)["group_size"]
    whole = module.to_quantized(group_size=group_size, bits=bits, mode=mode)
    monkeypatch.setattr(mlx_voxtral.quantize, "_QUANTIZE_BLOCK", 256 * 300)  # 4 blocks, the last short
    rows, quantize = [], mx.quantize
    monkeypatch.setattr(mx, "quantize", lambda w, *a, **k: rows.append(w.shape[0]) or quantize(w, *a, **k))
    blocked = mlx_voxtral.quantize.quantized_layer(module, group_size, bits, mode)
    monkeypatch.undo()
    assert rows[-4:] == [300, 300, 300, 100]
    a, b = dict(tree_flatten(whole.parameters())), dict(tree_flatten(blocked.parameters()))
    assert a.keys() == b.keys() and {"weight", "scales"} <= a.keys()
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)
