"""Where the CPU backend's time goes: each native kernel, cache operation and layer stack
timed around its call, over one offline transcription or one live stream in 80 ms chunks.

    python benchmarks/breakdown.py --random full --precision 4 --mode offline --seconds 20
    python benchmarks/breakdown.py --random full --precision 4 --mode streaming --seconds 10

Each row: total seconds, calls, milliseconds per decode step (offline) or per chunk
(streaming), and microseconds per call. Matmuls are split by their number of rows (1: a
decode step; 4: a live chunk's encoder). Nested rows overlap (``layer_rows`` holds the
kernels it calls), and timing each call adds about a microsecond to it. A short run of the
same audio first warms the kernels up.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_voxtral import bench  # noqa: E402
from mlx_voxtral.cpu import cache, layers, native  # noqa: E402
from mlx_voxtral.generate import transcribe  # noqa: E402
from mlx_voxtral.loader import load  # noqa: E402


class Timer:
    """Wall time and calls per name of the functions it wraps, while ``on``."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.on = False

    def wrap(self, owner, name: str, label: str, by_rows: bool = False) -> None:
        inner = getattr(owner, name)
        method = isinstance(owner, type)

        def timed(*args, **kwargs):
            if not self.on:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            key = f"{label}[{args[1 if method else 0].shape[0]}]" if by_rows else label
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            return out

        setattr(owner, name, timed)


def instrument(timer: Timer) -> None:
    timer.wrap(native.Matmuls, "__call__", "matmuls", by_rows=True)
    for name in ("attention", "attention_one", "silu_mul", "gelu", "rope", "rms_norm"):
        timer.wrap(native, name, name)
    timer.wrap(cache.HostKVCache, "append", "cache append")
    timer.wrap(cache.HostKVCache, "extend", "cache extend")
    timer.wrap(layers, "_conv_rows", "conv stem")
    timer.wrap(layers, "layer_rows", "layer_rows")
    for cls, label in ((layers.CPUEncoder, "encoder"), (layers.CPUAdapter, "adapter"), (layers.CPUDecoder, "decoder")):
        timer.wrap(cls, "__call__", label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint folder")
    src.add_argument("--random", choices=["tiny", "deep", "full"], help="a cached random-weight checkpoint")
    parser.add_argument("--precision", default="4", choices=sorted(bench.PRECISIONS))
    parser.add_argument("--mode", default="offline", choices=["offline", "streaming"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--audio", help="a recording to use (default: espeak-ng speech)")
    args = parser.parse_args(argv)
    from mlx_voxtral import cpu

    if not cpu.available():
        print(f"the CPU backend is not available: {cpu.unavailable_reason()}", file=sys.stderr)
        return 1
    timer = Timer()
    instrument(timer)
    model = load(str(bench.random_checkpoint(args.random)) if args.random else args.model,
                 **bench.load_options(args.precision, "cpu"))
    audio = bench.speech(args.seconds, args.audio)
    run = transcribe if args.mode == "offline" else bench._streaming
    run(model, audio[: 2 * bench.SAMPLE_RATE])
    timer.on = True
    start = time.perf_counter()
    out = run(model, audio)
    wall = time.perf_counter() - start
    if args.mode == "offline":
        steps = max(len(out.token_ids) - 1, 1)
        unit = "decode step"
        print(f"{args.seconds:g} s offline: wall {wall:.2f} s (RTFx {out.rtfx:.3f}); encoder {out.timings.encode:.2f} s, "
              f"prefill {out.timings.prefill:.2f} s, decode {out.timings.decode:.2f} s = "
              f"{1000 * out.timings.decode / steps:.1f} ms per step over {steps} steps")
    else:
        steps = max(round(len(audio) / (bench.SAMPLE_RATE * 0.08)), 1)
        unit = "chunk"
        print(f"{args.seconds:g} s live in 80 ms chunks: wall {wall:.2f} s (RTFx {out['rtfx']}), "
              f"{1000 * wall / steps:.1f} ms per chunk over {steps} chunks")
    print(f"{'':>16} {'s':>8} {'calls':>7} {'ms/' + unit:>16} {'us/call':>9}")
    for key in sorted(timer.seconds, key=lambda k: -timer.seconds[k]):
        s, n = timer.seconds[key], timer.calls[key]
        print(f"{key:>16} {s:8.3f} {n:7d} {1000 * s / steps:16.2f} {1e6 * s / n:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
