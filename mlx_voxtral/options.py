"""Command-line options shared by the subcommands that load a model (transcribe, listen, serve)."""

from __future__ import annotations

import argparse

from .loader import BACKENDS, DEFAULT_MODEL, DTYPES
from .quantize import MODES


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--quantize``, ``--group-size``, ``--quantize-mode``, ``--dtype`` and ``--backend``."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hugging Face repo id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
                        help="quantize the weights group-wise while loading (bits; mxfp4/nvfp4: 4, mxfp8: 8)")
    parser.add_argument("--group-size", type=int, choices=(16, 32, 64, 128), default=None,
                        help="quantization group size (default: the mode's, 64 for affine)")
    parser.add_argument("--quantize-mode", choices=tuple(MODES), default="affine",
                        help="quantization mode (default: affine)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="dtype of the weights (default: the checkpoint's)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="mlx (the plain MLX modules: Metal on a Mac), cpu (the Linux CPU backend) or "
                             "auto (default: $MLX_VOXTRAL_BACKEND, else auto)")


def load_model(args, quiet: bool = False):
    """The model the parsed ``add_model_args`` options ask for."""
    import sys

    from .loader import load

    if not quiet:
        print(f"loading {args.model} ...", file=sys.stderr)
    return load(args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size,
                backend=args.backend, mode=args.quantize_mode)
