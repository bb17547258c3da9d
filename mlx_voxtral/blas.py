"""Put an optimised BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel links the reference BLAS: fp32 matmuls run at a few GFLOP/s. Two
measured fixes, applied before ``mlx.core`` is imported (symbols bind at load time):

1. Load the system's OpenBLAS (or BLIS/MKL) with ``RTLD_GLOBAL`` so MLX's ``cblas_*``
   calls resolve to it: fp32 matmul 5 -> ~150 GFLOP/s on a 2-core x86-64 machine.
2. MLX computes a vector-matrix product (one decoded token) as ``cblas_sgemm`` with
   ``M = 1``; OpenBLAS packs the whole weight matrix for that, reading it twice. A tiny
   C shim, compiled once with the system C compiler and cached, forwards ``M = 1`` calls
   to ``cblas_sgemv``, which streams the weights once (3072 x 9216 fp32: 20-32 ms -> 6-8
   ms). Every other call goes to the BLAS unchanged.

Set ``MLX_VOXTRAL_SYSTEM_BLAS=0`` to turn both off, or to a library path to choose the
BLAS; ``MLX_VOXTRAL_BLAS_SHIM=0`` turns off only the shim. On macOS MLX already uses
Accelerate and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

_CANDIDATES = [
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libblis.so.4",
    "libmkl_rt.so.2",
]

_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
enum { RowMajor = 101, NoTrans = 111 };
typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float*, int,
                        const float*, int, float, float*, int);
typedef void (*sgemv_t)(int, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);
static sgemm_t real_sgemm;
static sgemv_t real_sgemv;

int mlx_voxtral_blas_init(const char* library) {
  void* handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  if (!handle) return 1;
  real_sgemm = (sgemm_t)dlsym(handle, "cblas_sgemm");
  real_sgemv = (sgemv_t)dlsym(handle, "cblas_sgemv");
  return (real_sgemm && real_sgemv) ? 0 : 2;
}

/* C[1, N] = alpha * op(A)[1, K] @ op(B)[K, N] + beta * C, as one sgemv over B. */
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float* A, int lda, const float* B, int ldb, float beta,
                 float* C, int ldc) {
  if (order == RowMajor && M == 1) {
    int incx = ta == NoTrans ? 1 : lda;
    if (tb == NoTrans)  /* B is [K, N]: y = B^T x */
      real_sgemv(RowMajor, 112, K, N, alpha, B, ldb, A, incx, beta, C, 1);
    else                /* B is [N, K]: y = B x */
      real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
    return;
  }
  real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
"""

loaded: Optional[str] = None  # the BLAS in use, if any
shim: Optional[str] = None  # the compiled shim in use, if any


def _off(value: str) -> bool:
    return value.lower() in ("0", "false", "off", "no")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_voxtral"


def _build_shim() -> Optional[Path]:
    """Compile the sgemm -> sgemv shim once (cached); None without a C compiler."""
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:16]
    target = _cache_dir() / f"blas-shim-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(_SHIM_SOURCE)
            out = Path(tmp) / "shim.so"
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                           check=True, capture_output=True, timeout=60)
            os.replace(out, target)  # atomic: concurrent first runs cannot see half a file
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _find_blas(choice: str) -> Optional[str]:
    """The first loadable BLAS (probed locally: global symbols come later, in order)."""
    candidates = [choice] if choice.lower() not in ("1", "true", "on", "yes") else []
    found = ctypes.util.find_library("openblas")
    for name in candidates + _CANDIDATES + ([found] if found else []):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL)
        except OSError:
            continue
        return name
    return None


def use_system_blas() -> Optional[str]:
    """Load an optimised BLAS (and the M = 1 shim) globally; return the BLAS name or None."""
    global loaded, shim
    choice = os.environ.get("MLX_VOXTRAL_SYSTEM_BLAS", "1")
    if loaded or not sys.platform.startswith("linux") or _off(choice):
        return loaded
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before mlx_voxtral, so the system BLAS could not be put in front "
            "of MLX's reference BLAS (CPU matmuls will be slow). Import mlx_voxtral first.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    name = _find_blas(choice)
    if name is None:
        return None
    # The shim goes first in the global scope so that its cblas_sgemm wins; it then loads
    # the BLAS globally itself (providing every other cblas_* symbol).
    path = None if _off(os.environ.get("MLX_VOXTRAL_BLAS_SHIM", "1")) else _build_shim()
    if path is not None:
        try:
            if ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL).mlx_voxtral_blas_init(name.encode()) == 0:
                shim = str(path)
        except OSError:
            pass
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    loaded = name
    return loaded
