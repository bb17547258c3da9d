#!/usr/bin/env python
"""Resident memory of a loaded model, full precision and quantized, relative to the checkpoint.

    python benchmarks/bench_memory.py --model checkpoints/full --bits none 8 4
    python benchmarks/bench_memory.py --model full-4bit --bits none --relative-to checkpoints/full

Each setting loads the model in a fresh Python process and reports, relative to the size of
the checkpoint's safetensors files (the bf16 size for Mistral's release):

* ``model``: resident memory after loading minus resident memory before (interpreter, MLX
  and the tokenizer library already imported): what the weights occupy;
* ``final``/``peak``: the whole process's resident memory after loading / at its highest;
* ``mlx``: MLX's own count of allocated bytes after loading.

Linux only for the resident figures (``/proc/self/status``); on macOS they are left out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path

def rss():
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

import mlx_voxtral
import mlx.core as mx

path, bits, group_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
quantize = None if bits == "none" else int(bits)
before = rss()
start = time.perf_counter()
model = mlx_voxtral.load(path, quantize=quantize, group_size=group_size)
seconds = time.perf_counter() - start
after = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
print(json.dumps({
    "before": before, "final": after, "peak": peak, "mlx": mx.get_active_memory(),
    "mlx_peak": mx.get_peak_memory(), "load_seconds": seconds,
    "quantization": model.args.quantization,
}))
"""


def measure(model: str, bits: str, group_size: int) -> dict:
    """Load ``model`` with ``bits`` in a fresh process; return its memory figures (bytes)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, bits, str(group_size)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (native or converted)")
    parser.add_argument("--bits", nargs="+", default=["none", "8", "4"], choices=["none", "8", "4"],
                        help="quantize while loading: settings to measure (default: none 8 4)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--relative-to", default=None,
                        help="checkpoint whose size is 1.0x (default: --model), e.g. the bf16 "
                             "source of a converted folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    reference = Path(args.relative_to or args.model)
    size = sum(f.stat().st_size for f in reference.glob("*.safetensors"))
    gib = 1 << 30
    rows = []
    print(f"{args.model}; 1.0x = {reference}: {size / gib:.2f} GiB of safetensors")
    columns = ["model x", "final x", "peak x", "mlx x", "load s"]
    print(f"{'bits':>5} {'model GiB':>10} " + " ".join(f"{c:>8}" for c in columns))
    for bits in args.bits:
        r = measure(args.model, bits, args.group_size)
        rel = lambda v: None if v is None else round(v / size, 4)  # noqa: E731
        model_bytes = None if r["final"] is None else r["final"] - r["before"]
        row = {
            "bits": bits, "group_size": args.group_size, "checkpoint_bytes": size,
            "model_bytes": model_bytes, "model_x": rel(model_bytes), "final_x": rel(r["final"]),
            "peak_x": rel(r["peak"]), "mlx_x": rel(r["mlx"]), "mlx_peak_x": rel(r["mlx_peak"]),
            "load_seconds": round(r["load_seconds"], 1), "quantization": r["quantization"],
        }
        rows.append(row)
        fmt = lambda v: "   n/a" if v is None else f"{v:.3f}"  # noqa: E731
        values = [row["model_x"], row["final_x"], row["peak_x"], row["mlx_x"]]
        print(f"{bits:>5} {fmt(None if model_bytes is None else model_bytes / gib):>10} "
              + " ".join(f"{fmt(v):>8}" for v in values) + f" {row['load_seconds']:>8.1f}",
              flush=True)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
