"""Use the system's optimised BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel links a reference BLAS: fp32 matmuls run at a few GFLOP/s. Loading
an optimised ``libopenblas`` (or BLIS/MKL) with ``RTLD_GLOBAL`` before ``mlx.core`` is
imported makes MLX's ``cblas_*`` calls resolve to it (measured: ~30x faster fp32 matmul
on a 2-core x86-64 machine). On macOS MLX already uses Accelerate; nothing is done.

Set ``MLX_VOXTRAL_SYSTEM_BLAS=0`` to turn this off, or to a library path to choose one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Optional

_CANDIDATES = [
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libblis.so.4",
    "libmkl_rt.so.2",
]

loaded: Optional[str] = None  # the library in use, if any


def use_system_blas() -> Optional[str]:
    """Load an optimised BLAS globally if possible; return its name (or None)."""
    global loaded
    choice = os.environ.get("MLX_VOXTRAL_SYSTEM_BLAS", "1")
    if loaded or not sys.platform.startswith("linux") or choice.lower() in ("0", "false", "off", "no"):
        return loaded
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before mlx_voxtral, so the system BLAS could not be put in front "
            "of MLX's reference BLAS (CPU matmuls will be slow). Import mlx_voxtral first.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    candidates = [choice] if choice not in ("1", "true", "on", "yes") else []
    found = ctypes.util.find_library("openblas")
    candidates += _CANDIDATES + ([found] if found else [])
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None
