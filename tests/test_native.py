"""The CPU backend's native code: float32, bfloat16 and quantized kernels, attention, and its
layers against the plain MLX modules."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral import cpu
from mlx_voxtral.cpu import native

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no CPU backend here (not Linux, no compiler or BLAS)")

ROWS = [1, 3, 8, 9, 64, 65, 200]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [256, 136])  # 136: not a multiple of 8 (scalar tail)
def test_bf16_matmul(rows, k):
    w = (mx.random.normal((300, k), key=mx.random.key(k)) * 0.05).astype(mx.bfloat16)
    mx.eval(w)
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    ref = x.astype(np.float64) @ np.array(w.astype(mx.float32)).astype(np.float64).T
    assert _rel(native.bf16_matmul(x, w), ref) < 1e-5


@pytest.mark.parametrize("rows", ROWS)
# K = 576 (where it is whole groups): rows that end in half a 16-word block
@pytest.mark.parametrize(
    "bits, group_size, k",
    [(b, g, k) for b, g in [(4, 64), (4, 128), (8, 32), (8, 64), (8, 128)] for k in (512, 576) if k % g == 0],
)
@pytest.mark.parametrize("scale_dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("integer", [True, False])  # False: the float kernels of CPUs without AVX2
def test_quantized_matmul(rows, bits, group_size, k, scale_dtype, integer):
    w = mx.random.normal((260, k), key=mx.random.key(bits)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
    mx.eval(wq, scales, biases)
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    deq = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    xq = native.quantize_activations(x, group_size)
    ref = xq.astype(np.float64) @ np.array(deq).astype(np.float64).T
    assert native.quantized_supported(group_size, bits)
    assert _rel(native.quantized_matmul(x, wq, scales, biases, group_size, bits, integer), ref) < 1e-5


@pytest.mark.parametrize("scale_dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits, group_size, k, n", [(4, 64, 576, 77), (4, 128, 512, 40), (8, 32, 320, 33), (8, 64, 1280, 64)])
def test_integer_tiles(bits, group_size, k, n, scale_dtype):
    """``many``: every number of rows through the integer tiles (columns past a whole tile,
    rows past a whole register tile), each row's result the bits it has alone; the tiles
    laid out keep the scales and biases in their own precision."""
    w = mx.random.normal((n, k), key=mx.random.key(k)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
    mx.eval(wq, scales, biases)
    deq = np.array(mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits))
    x = np.random.default_rng(n).standard_normal((70, k)).astype(np.float32)
    ref = native.quantize_activations(x, group_size).astype(np.float64) @ deq.astype(np.float64).T
    tiles = native.Matmuls([(wq, scales, biases)], group_size, bits, many=True)
    y = tiles(x)[0]
    assert _rel(y, ref) < 1e-5
    assert tiles.tiles_nbytes == 0  # many rows transpose the tiles in cache
    for rows in (slice(69, 70), slice(3, 7), slice(0, 13)):
        assert np.array_equal(tiles(x[rows])[0], y[rows])
    # a few rows lay the tiles out once (where the CPU has AVX-512 VNNI or AVX2) and read them from then on
    laid_out = tiles.tiles_nbytes
    assert laid_out == 0 or laid_out >= wq.nbytes
    fresh = native.Matmuls([(wq, scales, biases)], group_size, bits, many=True)
    assert np.array_equal(fresh(x[:4])[0], y[:4])
    assert fresh.tiles_nbytes == laid_out
    assert np.array_equal(fresh(x)[0], y)
    if laid_out:
        words = laid_out - sum(st.nbytes for _, st in fresh._tiles)
        assert {st.itemsize for _, st in fresh._tiles} == {scales.itemsize} and words >= wq.nbytes


def test_unsupported_group_is_reported():
    assert not native.quantized_supported(32, 4)  # a group smaller than one 8-word block


def test_rows_do_not_depend_on_their_batch():
    """A stream's logits must not change with the other streams in its batch: each row of
    the few-row kernels (float32, bfloat16, quantized) is computed independently."""
    w = (mx.random.normal((512, 384)) * 0.05).astype(mx.bfloat16)
    wq = mx.quantize(w.astype(mx.float32), group_size=64, bits=4)
    wf = w.astype(mx.float32)
    mx.eval(w, wq, wf)
    x = np.random.default_rng(0).standard_normal((7, 384)).astype(np.float32)
    for row in range(7):
        alone = x[row : row + 1]
        assert np.array_equal(native.bf16_matmul(x, w)[row], native.bf16_matmul(alone, w)[0])
        for integer in (True, False):
            batch, one = (native.quantized_matmul(r, *wq, 64, 4, integer) for r in (x, alone))
            assert np.array_equal(batch[row], one[0])
        assert np.array_equal(native.Matmuls([wf])(x)[0][row], native.Matmuls([wf])(alone)[0][0])


def _attention_reference(q, k, v, scale, window):
    """float64 sliding-window causal attention; queries are the last keys' positions."""
    h, sq, _ = q.shape
    hkv, sk, _ = k.shape
    qp, kp = np.arange(sk - sq, sk)[:, None], np.arange(sk)[None]
    mask = (kp <= qp) & (kp > qp - window)
    k, v = (np.repeat(t, h // hkv, 0).astype(np.float64) for t in (k, v))
    s = np.where(mask, np.einsum("hqd,hkd->hqk", q.astype(np.float64), k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,hkd->qhd", p, v).reshape(sq, -1)


@pytest.mark.parametrize(
    "heads, kv_heads, queries, keys, head_dim, window",
    [
        (4, 4, 37, 100, 48, 20),  # band narrower than the block, rows not a multiple of 6
        (4, 2, 5, 5, 16, 100),  # grouped-query, window past the keys
        (32, 8, 39, 39, 128, 8192),  # the decoder's prompt
        (3, 1, 2, 50, 32, 10),
        (4, 4, 100, 849, 64, 750),  # the encoder's window
        (2, 2, 7, 7, 16, 1),  # each query sees only itself
    ],
)
def test_attention(heads, kv_heads, queries, keys, head_dim, window):
    rng = np.random.default_rng(keys)
    q = rng.standard_normal((heads, queries, head_dim)).astype(np.float32) * 2
    k, v = (rng.standard_normal((kv_heads, keys, head_dim)).astype(np.float32) for _ in "kv")
    got = native.attention(q, k, v, head_dim**-0.5, window)
    assert got.shape == (queries, heads * head_dim)
    assert np.abs(got - _attention_reference(q, k, v, head_dim**-0.5, window)).max() < 1e-5


def test_attention_does_not_depend_on_the_chunking():
    """Streaming feeds the encoder 4 queries at a time with its cache's keys in front; the
    result must be the same bits as one offline block."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((8, 300, 64)).astype(np.float32) for _ in "qkv")
    window = 50
    whole = native.attention(q, k, v, 0.125, window)
    parts, start = [], 0
    for n in [4, 4, 8, 40, 4, 100, 140]:
        first = max(0, start - (window - 1))
        end = start + n
        parts.append(native.attention(q[:, start:end], k[:, first:end], v[:, first:end], 0.125, window))
        start = end
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("d", [32, 64])  # 64: the values in one pass (the encoder's head size)
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("window", [3, 50, 700])  # smaller than a chunk, between, past every key
def test_attention_over_a_cache_does_not_depend_on_the_chunking(bf16, window, d):
    """Streaming through a ``HostKVCache``: each chunk attends over the cache's buffer in
    place, in its storage dtype (the ring compacted and reallocated along the way, heads a
    capacity apart); the result must be the same bits as one block over the whole
    (rounded) keys, and the bf16 bits read in place the same as their float32 values."""
    from mlx_voxtral.cpu.cache import HostKVCache, from_bf16, to_bf16

    rng = np.random.default_rng(window)
    heads, kv_heads, total = 4, 2, 600
    q = rng.standard_normal((heads, total, d)).astype(np.float32)
    k, v = (rng.standard_normal((kv_heads, total, d)).astype(np.float32) for _ in "kv")
    if bf16:
        k, v = (from_bf16(to_bf16(t)) for t in (k, v))
    whole = native.attention(q, k, v, 0.2, window)
    assert np.abs(whole - _attention_reference(q, k, v, 0.2, window)).max() < 1e-5
    cache, parts, start = HostKVCache(window, bf16), [], 0
    cache.slack = 20  # compact often
    for n in [4, 4, 2, 60, *[4] * 40, 3, 130, *[2] * 50, 5, 132]:
        kv = cache.extend(k[:, start : start + n], v[:, start : start + n])
        assert kv[0].dtype == (np.uint16 if bf16 else np.float32)
        parts.append(native.attention(q[:, start : start + n], *kv, 0.2, window))
        if bf16:
            assert np.array_equal(native.attention(q[:, start : start + n], *map(from_bf16, kv), 0.2, window),
                                  parts[-1])
        start += n
    assert start == total
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("heads, kv_heads, keys, capacity, head_dim",
                         [(32, 8, 300, 512, 128), (4, 2, 3, 3, 48), (6, 1, 37, 40, 64), (5, 5, 1, 256, 16),
                          (8, 2, 129, 130, 32)])
def test_attention_one_over_a_bf16_cache(heads, kv_heads, keys, capacity, head_dim):
    """A decode step: one query per head over the first ``keys`` of a bfloat16 buffer."""
    rng = np.random.default_rng(keys)
    q = rng.standard_normal((heads, head_dim)).astype(np.float32) * 2
    k, v = (mx.array(rng.standard_normal((kv_heads, capacity, head_dim)).astype(np.float32)).astype(mx.bfloat16)
            for _ in "kv")
    mx.eval(k, v)
    got = native.attention_one(q, k, v, keys, head_dim**-0.5)
    k32, v32 = (np.array(t.astype(mx.float32))[:, :keys] for t in (k, v))
    ref = _attention_reference(q[:, None], k32, v32, head_dim**-0.5, keys).reshape(-1)
    assert np.abs(got - ref).max() < 1e-5
    with pytest.raises(ValueError, match="keys asked"):
        native.attention_one(q, k, v, capacity + 1, 1.0)


def test_attention_rejects_unsupported_shapes():
    assert not native.attention_supported(24)
    with pytest.raises(ValueError, match="no native attention"):
        native.attention(*(np.zeros((2, 4, 24), np.float32) for _ in "qkv"), 1.0, 4)


def test_gelu_matches_mlx():
    """The native exact GELU against ``nn.gelu`` and float64: the special values alike, the
    rest within float32 rounding of ``x (1 + erf)``. MLX's erf is a different
    approximation, itself up to about 4 units of ``2**-24 |x|`` from the exact GELU."""
    import mlx.nn as nn

    x = np.random.default_rng(0).standard_normal((50, 1001)).astype(np.float32) * 4
    x[0, :12] = [0.0, -0.0, 1e-30, -1e-30, 1e-40, 10, -10, 90, -90, 3e38, -3e38, np.inf]
    got, ref = native.gelu(x), np.array(nn.gelu(mx.array(x)))
    assert got.shape == x.shape and got.dtype == np.float32
    finite = np.isfinite(ref)
    assert np.array_equal(got[~finite], ref[~finite], equal_nan=True)
    x64, got64 = x[finite].astype(np.float64), got[finite].astype(np.float64)
    assert np.all(np.abs(got64 - ref[finite]) <= 6 * 2.0**-24 * np.abs(x64))
    exact = x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2))) / 2
    assert np.all(np.abs(got64 - exact) <= 2 * 2.0**-24 * np.abs(x64) + 1e-45)


def test_read_sum():
    data = np.random.default_rng(0).standard_normal(100_003).astype(np.float32)
    assert native.read_sum(data) == pytest.approx(float(data.astype(np.float64).sum()), abs=1e-2)


def test_silu_mul():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 301)).astype(np.float32) * 8
    a[0, :5] = [0.0, -0.0, 90.0, -90.0, 1e-30]
    b = rng.standard_normal((37, 301)).astype(np.float32)
    a64 = a.astype(np.float64)
    ref = a64 / (1 + np.exp(-a64)) * b
    assert np.abs(native.silu_mul(a, b) - ref).max() < 1e-5 * np.abs(ref).max()
    with pytest.raises(ValueError, match="equal shapes"):
        native.silu_mul(a, b[:3])


@pytest.mark.parametrize("n", [9216, 70_001])
def test_silu_mul_on_one_core_and_all_the_same(n):
    """Below the threshold the gate runs on one core, above it on all: the same values."""
    rng = np.random.default_rng(n)
    a, b = (rng.standard_normal(n).astype(np.float32) * 4 for _ in "ab")
    y = native.silu_mul(a, b)
    assert np.array_equal(y[:4096], native.silu_mul(a[:4096], b[:4096]))


@pytest.mark.parametrize("rows", [1, 4, 700])
def test_native_rope_has_numpy_bits(rows):
    """RoPE on interleaved pairs with every product rounded: numpy's float32 arithmetic
    exactly, on one core (a decode position) and on all (an encoder block)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 32, 64)).astype(np.float32)
    angles = rng.uniform(-10, 10, (rows, 32))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    ref = np.empty_like(x)
    ref[..., 0::2] = even * cos[:, None] - odd * sin[:, None]
    ref[..., 1::2] = even * sin[:, None] + odd * cos[:, None]
    assert np.array_equal(native.rope(x, cos, sin), ref)
    with pytest.raises(ValueError, match="angles"):
        native.rope(x, cos[:, :3], sin[:, :3])


def test_native_rms_norm():
    """RMS norm (times an optional scale, one for all rows or one per row) against float64,
    and a row's bits the same alone as among others (a streamed row meets offline's)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 1283)).astype(np.float32) * 3
    w, s = rng.standard_normal(1283).astype(np.float32), rng.standard_normal((300, 1283)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * w
    for scale, want in ((None, ref), (s[0], ref * s[0]), (s, ref * s)):
        y = native.rms_norm(x, w, 1e-5, scale)
        assert np.abs(y - want).max() < 1e-5 * np.abs(want).max()
        one = native.rms_norm(x[7:8], w, 1e-5, None if scale is None else scale if scale.ndim == 1 else scale[7:8])
        assert np.array_equal(one, y[7:8])
    with pytest.raises(ValueError, match="a norm of"):
        native.rms_norm(x, w[:5], 1e-5)
    with pytest.raises(ValueError, match="a scale of"):
        native.rms_norm(x, w, 1e-5, s[:3])


@pytest.mark.parametrize("shape", [(1, 3072, 2000), (5, 700, 300), (8, 64, 4096), (40, 128, 96)])
def test_float32_matmul(shape):
    """float32 weights: few rows in the native kernel, one row and many rows in the BLAS."""
    m, k, n = shape
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((n, k)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    w = mx.array(b)
    mx.eval(w)
    assert _rel(native.Matmuls([w])(a)[0], ref) < 1e-5


def test_backend_layers_are_in_place(tiny_checkpoint):
    """The CPU backend puts its encoder, adapter and decoder in the model's place, holding
    the same parameters (no copy, no class swapped on a live module)."""
    from mlx.utils import tree_flatten

    from mlx_voxtral.cpu.layers import CPUAdapter, CPUDecoder, CPUEncoder
    from mlx_voxtral.layers import Attention

    model = mlx_voxtral.load(tiny_checkpoint, backend="cpu")
    plain = mlx_voxtral.load(tiny_checkpoint, backend="mlx", dtype=mx.float32)
    assert (type(model.encoder), type(model.adapter), type(model.decoder)) == (CPUEncoder, CPUAdapter, CPUDecoder)
    assert type(model.decoder.layers[0].attention) is Attention
    assert [k for k, _ in tree_flatten(model.parameters())] == [k for k, _ in tree_flatten(plain.parameters())]
    assert model.backend == "cpu" and plain.backend == "mlx"


def _plain_twin(model):
    """The plain MLX modules over the very arrays of a CPU-backend model (its dtypes: float32
    but for the matmul weights)."""
    from mlx.utils import tree_flatten, tree_unflatten

    quantize = model.args.quantization["bits"] if model.args.quantization else None
    plain = mlx_voxtral.load(model.path, backend="mlx", quantize=quantize)
    plain.update(tree_unflatten(list(tree_flatten(model.parameters()))))
    return plain


def test_activations_round_to_8_bits_per_group():
    """What the quantized kernels multiply: every group within half a step of x, the step
    being the group's largest magnitude over 127; a group of zeros stays zero."""
    x = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    x[1, 64:128] = 0
    xq = native.quantize_activations(x, 64)
    step = np.abs(x.reshape(3, 4, 64)).max(-1, keepdims=True) / 127
    assert np.all(np.abs(xq - x).reshape(3, 4, 64) <= step / 2 + 1e-7)
    assert np.all(xq[1, 64:128] == 0)
    levels = np.round(xq[0, :64] / step[0, 0])
    assert np.abs(levels).max() == 127 and np.allclose(xq[0, :64], levels * step[0, 0])


@pytest.mark.parametrize("rows", [1, 3, 65])
def test_several_matrices_in_one_call_equal_one_at_a_time(rows):
    """A layer's q, k and v (or w1 and w3) go through the kernels in one pass; each result
    is exactly that of its own call."""
    x = np.random.default_rng(rows).standard_normal((rows, 384)).astype(np.float32)
    ws = [(mx.random.normal((n, 384), key=mx.random.key(n)) * 0.05).astype(mx.bfloat16) for n in (256, 64, 72)]
    qs = [mx.quantize(w.astype(mx.float32), group_size=64, bits=4) for w in ws]
    mx.eval(ws, qs)
    for together, w in zip(native.bf16_matmuls(x, ws), ws):
        assert np.array_equal(together, native.bf16_matmul(x, w))
    for integer in (True, False):
        for together, q in zip(native.quantized_matmuls(x, qs, 64, 4, integer), qs):
            assert np.array_equal(together, native.quantized_matmul(x, *q, 64, 4, integer))


@pytest.mark.parametrize("offset", [0, 37, 3000])
def test_rope_matches_mlx(offset):
    """The CPU layers' RoPE (numpy, float64 angles) against ``mx.fast.rope``: equal up to
    MLX's float32 angles (their error grows with the position)."""
    from mlx_voxtral.cpu.layers import rope

    x = np.random.default_rng(offset).standard_normal((5, 4, 64)).astype(np.float32)
    ref = mx.fast.rope(mx.array(x.transpose(1, 0, 2))[None], 64, traditional=True, base=1e6, scale=1.0, offset=offset)
    ref = np.array(ref)[0].transpose(1, 0, 2)
    assert np.abs(rope(x, offset, 1e6) - ref).max() < 1e-5 * max(offset, 10)


def _decoder_passes(model):
    """Logits of two rows' prompts with different delays (each alone, as the driver runs
    prompts), then of one decode step of both rows in one pass."""
    rng = np.random.default_rng(0)
    dim, vocab = model.args.dim, model.args.vocab_size
    cache = model.make_cache(model.tokenizer.max_prompt_length)
    cache.add_row(), cache.add_row()
    out = []
    for row, (n, d) in enumerate([(5, 6), (3, 2)]):
        audio = mx.array(rng.standard_normal((1, n, dim)).astype(np.float32) * 0.5)
        tokens = mx.array(rng.integers(0, vocab, (1, n)))
        out.append(np.array(model(audio, tokens, cache, slice(row, row + 1), [n], [d])))
    audio = mx.array(rng.standard_normal((2, 1, dim)).astype(np.float32) * 0.5)
    tokens = mx.array(rng.integers(0, vocab, (2, 1)))
    out.append(np.array(model(audio, tokens, cache, slice(0, 2), [1, 1], [6, 2])))
    return out


@pytest.mark.parametrize("dtype, quantize, floor", [("float32", None, None), (None, None, 0.9999), (None, 8, 0.999)])
def test_cpu_decoder_matches_plain_mlx(tiny_checkpoint, dtype, quantize, floor):
    """The CPU decoder (residual stream and norms in numpy, LM head of the last rows only)
    against the plain MLX modules over the same arrays in float32 activations: prompts with
    their own delays, then a decode step of both rows. In float32 they agree to 1e-4; with
    bf16 or quantized weights they differ by the CPU backend's bf16 key cache and 8-bit
    activations (cosine floor)."""
    from mlx_voxtral.cpu.layers import CPUDecoder

    fast = mlx_voxtral.load(tiny_checkpoint, dtype=dtype, quantize=quantize, backend="cpu")
    assert isinstance(fast.decoder, CPUDecoder)
    plain = _plain_twin(fast)
    for got, ref in zip(_decoder_passes(fast), _decoder_passes(plain)):
        assert got.shape == ref.shape
        if floor is None:
            assert _rel(got, ref) < 1e-4
        else:
            cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
            assert cos.min() > floor


def test_cpu_layers_follow_replaced_weights(tiny_checkpoint):
    """The CPU layers keep their weights' addresses; replacing a layer's weights (``update``,
    ``load_weights``) must take effect."""
    from mlx_voxtral.cpu.layers import feed_forward_rows

    model = mlx_voxtral.load(tiny_checkpoint, backend="cpu")
    layer = model.decoder.layers[0].feed_forward
    x = np.random.default_rng(1).standard_normal((2, model.args.dim)).astype(np.float32)
    before = feed_forward_rows(layer, x)
    layer.update({"w2": {"weight": (layer.w2.weight.astype(mx.float32) * 2).astype(mx.bfloat16)}})
    assert np.allclose(feed_forward_rows(layer, x), 2 * before, rtol=1e-5, atol=1e-6)


def test_rms_norm_matches_mlx():
    import mlx.nn as nn

    from mlx_voxtral.cpu.layers import rms_norm

    norm = nn.RMSNorm(96, eps=1e-5)
    norm.weight = mx.random.normal((96,), key=mx.random.key(2))
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32) * 3
    assert _rel(rms_norm(x, norm), np.array(norm(mx.array(x)))) < 1e-6
