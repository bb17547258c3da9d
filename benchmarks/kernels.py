"""Time the CPU backend's kernels as a live chunk's encoder meets them: its 32 layers' 4-bit
matmuls for a few rows, weights streamed from memory (laid out in the integer tiles once, or
transposed per call), and chunked attention over the 750-frame window (bf16 cache, cold).

    python benchmarks/kernels.py --rows 4 --queries 1,4,16

Random weights and activations with the full-size encoder's shapes (dim 1280, FFN 5120, 32
heads of 64 over dim 1280); each figure is the last of ``--repeats`` passes over all layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlx_voxtral.cpu import native  # noqa: E402
from mlx_voxtral.cpu.cache import to_bf16  # noqa: E402


def encoder_matmuls(rows: int, layers: int, dim: int, attn: int, hidden: int, repeats: int) -> dict:
    """ms per pass over ``layers`` layers' q/k/v, o, w1/w3 and w2 at 4 bits, group 64."""
    shapes = [(attn, dim)] * 3 + [(dim, attn)] + [(hidden, dim)] * 2 + [(dim, hidden)]
    weights = []
    for i in range(layers):
        mats = []
        for n, k in shapes:
            w = mx.random.normal((n, k), key=mx.random.key(i * 8 + len(mats))) * 0.05
            q, s, b = mx.quantize(w, group_size=64, bits=4)
            mats.append((q, s.astype(mx.bfloat16), b.astype(mx.bfloat16)))
        mx.eval(mats)
        weights.append(mats)
    x, a, h = (np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32) for n in (dim, attn, hidden))
    out = {}
    for laid_out in (False, True):
        passes = []
        for mats in weights:
            groups = [mats[:3], mats[3:4], mats[4:6], mats[6:]]
            products = [native.Matmuls(g, 64, 4, many=True) for g in groups]
            if not laid_out:
                for p in products:
                    p._tiles = []  # never lay the tiles out: transposed per call
            passes.append(products)
        for _ in range(repeats):
            t = time.perf_counter()
            for qkv, o, w13, w2 in passes:
                qkv(x), o(a), w13(x), w2(h)
            elapsed = time.perf_counter() - t
        out["laid out" if laid_out else "per call"] = round(1000 * elapsed, 2)
    return out


def chunk_attention(queries: list[int], layers: int, heads: int, window: int, head_dim: int,
                    repeats: int) -> dict:
    """ms per pass of ``queries`` new positions over ``layers`` layers' bf16 caches of a full
    window (each layer's cache a different buffer, so the pass reads them from memory)."""
    rng = np.random.default_rng(0)
    keys = window + 3
    caches = [[to_bf16(rng.standard_normal((heads, keys, head_dim)).astype(np.float32)) for _ in "kv"]
              for _ in range(layers)]
    out = {}
    for n in queries:
        q = rng.standard_normal((heads, n, head_dim)).astype(np.float32)
        for _ in range(repeats):
            t = time.perf_counter()
            for k, v in caches:
                native.attention(q, k, v, head_dim ** -0.5, window)
            elapsed = time.perf_counter() - t
        out[n] = round(1000 * elapsed, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="rows of the matmuls (a live chunk: 4)")
    parser.add_argument("--queries", default="1,4,16", help="new positions per attention pass, comma list")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=750)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not native.load():
        print(f"the CPU backend's kernels are not available: {native.error()}", file=sys.stderr)
        return 1
    mm = encoder_matmuls(args.rows, args.layers, args.dim, args.heads * args.head_dim, args.hidden, args.repeats)
    print(f"{args.layers} layers' 4-bit matmuls, {args.rows} rows: " + ", ".join(f"{k} {v} ms" for k, v in mm.items()))
    att = chunk_attention([int(n) for n in args.queries.split(",")], args.layers, args.heads, args.window,
                          args.head_dim, args.repeats)
    print(f"{args.layers} layers' chunked attention over {args.window} keys: "
          + ", ".join(f"{n} queries {v} ms" for n, v in att.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
