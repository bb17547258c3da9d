"""Put an optimised BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel links the reference BLAS: fp32 matmuls run at a few GFLOP/s. Two
measured fixes, applied before ``mlx.core`` is imported (symbols bind at load time):

1. Load the system's OpenBLAS (or BLIS/MKL) with ``RTLD_GLOBAL`` so MLX's ``cblas_*``
   calls resolve to it: fp32 matmul 5 -> ~150 GFLOP/s on a 2-core x86-64 machine.
2. Decoding multiplies a few rows (one per stream) by each weight matrix. OpenBLAS
   (0.3.21, Debian 12) packs the whole weight matrix for that, reading it twice. A small
   C shim, compiled once with the system C compiler and cached, takes those calls:
   ``M <= 8`` rows times a transposed weight go to a kernel that streams the weights once
   on all cores (OpenMP); other ``M = 1`` products go to ``cblas_sgemv``. Measured on
   3072 x 9216 fp32: 1 row 20-37 ms -> 5-8 ms, 8 rows 23-46 ms -> 11-21 ms. Every other
   call goes to the BLAS unchanged.

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
#include <string.h>
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
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

#ifdef _OPENMP
/* C = alpha A B^T + beta C for a few rows (M <= SMALL_M): A [M, K], B [N, K] row-major.
   Each thread streams its share of B's rows once, 4 at a time, in K blocks that stay in
   L1 while every pair of A rows is multiplied with them. */
#define SMALL_M 8
#define K_BLOCK 512
typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float* p) { v8 v; memcpy(&v, p, 32); return v; }

static void small_sgemm_nt(int M, int N, int K, float alpha, const float* A, int lda,
                           const float* B, int ldb, float beta, float* C, int ldc) {
  int K8 = K & ~7;
  #pragma omp parallel for schedule(static)
  for (int n0 = 0; n0 < N; n0 += 4) {
    int nb = N - n0 < 4 ? N - n0 : 4;
    v8 acc[SMALL_M + 1][4];
    memset(acc, 0, sizeof(acc));
    const float* b[4];
    for (int j = 0; j < 4; j++) b[j] = B + (size_t)(n0 + (j < nb ? j : 0)) * ldb;
    for (int k0 = 0; k0 < K8; k0 += K_BLOCK) {
      int k1 = k0 + K_BLOCK < K8 ? k0 + K_BLOCK : K8;
      for (int m0 = 0; m0 < M; m0 += 2) {
        const float* a0p = A + (size_t)m0 * lda;
        const float* a1p = A + (size_t)(m0 + 1 < M ? m0 + 1 : m0) * lda;
        v8 c00 = acc[m0][0], c01 = acc[m0][1], c02 = acc[m0][2], c03 = acc[m0][3];
        v8 c10 = acc[m0 + 1][0], c11 = acc[m0 + 1][1], c12 = acc[m0 + 1][2], c13 = acc[m0 + 1][3];
        for (int k = k0; k < k1; k += 8) {
          v8 b0 = load8(b[0] + k), b1 = load8(b[1] + k), b2 = load8(b[2] + k), b3 = load8(b[3] + k);
          v8 a0 = load8(a0p + k), a1 = load8(a1p + k);
          c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
          c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
        }
        acc[m0][0] = c00; acc[m0][1] = c01; acc[m0][2] = c02; acc[m0][3] = c03;
        acc[m0 + 1][0] = c10; acc[m0 + 1][1] = c11; acc[m0 + 1][2] = c12; acc[m0 + 1][3] = c13;
      }
    }
    for (int i = 0; i < M; i++) {
      const float* a = A + (size_t)i * lda;
      for (int j = 0; j < nb; j++) {
        float s = 0;
        for (int l = 0; l < 8; l++) s += acc[i][j][l];
        for (int k = K8; k < K; k++) s += a[k] * b[j][k];
        float* c = C + (size_t)i * ldc + n0 + j;
        *c = alpha * s + (beta == 0.0f ? 0.0f : beta * *c);
      }
    }
  }
}
#endif

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float* A, int lda, const float* B, int ldb, float beta,
                 float* C, int ldc) {
  if (order == RowMajor) {
#ifdef _OPENMP
    if (M <= SMALL_M && ta == NoTrans && tb == Trans) {  /* x @ W.T with W [N, K] */
      small_sgemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      return;
    }
#endif
    if (M == 1) {  /* C[1, N] = alpha op(A) op(B) + beta C as one sgemv over B */
      int incx = ta == NoTrans ? 1 : lda;
      if (tb == NoTrans)  /* B is [K, N]: y = B^T x */
        real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, incx, beta, C, 1);
      else                /* B is [N, K]: y = B x */
        real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
      return;
    }
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


def _cpu_id() -> str:
    """What the shim is tuned for (it is built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return ""


def _build_shim() -> Optional[Path]:
    """Compile the shim once per source and CPU (cached); None without a C compiler."""
    digest = hashlib.sha256((_SHIM_SOURCE + _cpu_id()).encode()).hexdigest()[:16]
    target = _cache_dir() / f"blas-shim-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # OpenMP gives the few-row kernel its threads; without it only the sgemv path is built.
    for flags in (["-O3", "-march=native", "-fopenmp"], ["-O2"]):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(_SHIM_SOURCE)
            out = Path(tmp) / "shim.so"
            try:
                subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent first runs never see half a file
                return target
            except (OSError, subprocess.SubprocessError):
                continue
    return None


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
