"""Fast CPU paths for MLX on Linux: an optimised BLAS and a few native kernels.

MLX's Linux CPU wheel links the reference BLAS, its own bfloat16 and quantized CPU matmuls
are scalar loops, and its attention and elementwise ops run on one core. Measured on a
2-core x86-64 machine (AMD EPYC, AVX-512; 3072 x 9216 weights unless said):

===============================  ==========  ============================
                                 MLX alone   with this module
===============================  ==========  ============================
one row, float32                 20-39 ms    6-8 ms (OpenBLAS sgemv)
one row, bfloat16                34-50 ms    1.25 ms (native, ~45 GB/s)
one row, 4-bit (group 64)        26-32 ms    0.30 ms (native, 8-bit x)
eight rows, bfloat16                         4.4 ms (native)
float32 matmul, 1024 rows        5 GFLOP/s   ~230 GFLOP/s (OpenBLAS)
attention, 1500 x 2249 keys      1.65 s      62 ms (native, 32 heads)
SwiGLU gate, 1500 x 5120         106 ms      12 ms (native)
===============================  ==========  ============================

What it does, before ``mlx.core`` is imported (symbols bind at load time):

1. Loads the system's OpenBLAS (or BLIS/MKL) with ``RTLD_GLOBAL`` so MLX's ``cblas_*`` calls
   resolve to it.
2. Compiles ``native.c`` once with the system C compiler (cached under
   ``~/.cache/mlx_voxtral``, keyed by source and CPU) and loads it in front of the BLAS: its
   ``cblas_sgemm`` takes the few-row products OpenBLAS handles badly (it packs the whole
   weight matrix) and passes everything else on. It also holds the bfloat16 and 4/8-bit
   matmuls, the attention kernels and the SwiGLU gate that ``mlx_voxtral.cpu`` uses.

``MLX_VOXTRAL_SYSTEM_BLAS=0`` turns everything off (or names the BLAS library to use);
``MLX_VOXTRAL_NATIVE=0`` keeps the BLAS but skips the compiled library. Nothing is done on
macOS, where MLX uses Accelerate and Metal.
"""

from __future__ import annotations

import contextlib
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

import numpy as np

_CANDIDATES = [
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libblis.so.4",
    "libmkl_rt.so.2",
]
_SOURCE = Path(__file__).with_name("native.c")

FEW_ROWS = 8  # the native kernels' row limit (FEW_ROWS in native.c)

loaded: Optional[str] = None  # the BLAS in use, if any
library: Optional[str] = None  # the compiled native library in use, if any
_lib: Optional[ctypes.CDLL] = None


def _off(value: str) -> bool:
    return value.lower() in ("0", "false", "off", "no")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_voxtral"


def _cpu_id() -> str:
    """What the library is tuned for (it is built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return ""


def _build() -> Optional[Path]:
    """Compile native.c once per source and CPU (cached); None without a C compiler."""
    source = _SOURCE.read_text()
    digest = hashlib.sha256((source + _cpu_id()).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # OpenMP gives the kernels their threads; without it only the sgemv forwarding is built.
    for flags in (["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"], ["-O2", "-ffp-contract=off"]):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "native.so"
            try:
                subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(_SOURCE), "-ldl", "-lm"],
                               check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                continue
            os.replace(out, target)  # atomic: concurrent first runs never see half a file
            return target
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


# libgomp's spin count for idle threads (3000 and 20000 measured): long enough to bridge
# most of the Python between a decode step's kernels, short enough not to hold a core
# through the BLAS call after a kernel.
SPIN_COUNT = "20000"


@contextlib.contextmanager
def _short_spin_openmp():
    """Load OpenMP with idle threads that spin briefly, then sleep.

    The kernels' OpenMP threads and OpenBLAS's own threads take turns on the same cores.
    Spinning for long (libgomp's default, or active) steals a core from the BLAS call that
    follows (a 30 s encoder block in bf16: 35 s with active threads, 19-20 s passive);
    sleeping at once makes every kernel wait for its threads to wake (a 4-bit decode step:
    121 ms passive, 96 ms active). A short spin gets both: encoder 18-20 s, decode 102 ms.
    libgomp reads the settings once, when it loads, so the variables are set only for that
    moment (OMP_WAIT_POLICY=passive for other OpenMP runtimes). A user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ.update(OMP_WAIT_POLICY="passive", GOMP_SPINCOUNT=SPIN_COUNT)
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]


def use_system_blas() -> Optional[str]:
    """Load the optimised BLAS and the native library globally; return the BLAS name or None."""
    global loaded, library, _lib
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
    # The native library goes first in the global scope so that its cblas_sgemm wins; it
    # then loads the BLAS globally itself (providing every other cblas_* symbol).
    path = None if _off(os.environ.get("MLX_VOXTRAL_NATIVE", "1")) else _build()
    if path is not None:
        try:
            with _short_spin_openmp():
                lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            if lib.mlx_voxtral_blas_init(name.encode()) == 0:
                lib.mlx_voxtral_read_sum.restype = ctypes.c_float
                library, _lib = str(path), lib
        except OSError:
            pass
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    loaded = name
    return loaded


def kernels_available() -> bool:
    """True when the few-row bfloat16 / quantized kernels are compiled and loaded."""
    return _lib is not None and bool(_lib.mlx_voxtral_kernels())


def _pointer(array) -> ctypes.c_void_p:
    """Address of an evaluated, row-contiguous MLX array's data (any dtype, no copy)."""
    return ctypes.c_void_p(np.frombuffer(memoryview(array).cast("B"), np.uint8).ctypes.data)


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _pointers(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * len(arrays))(*(_pointer(a) for a in arrays))


class Matmuls:
    """``[x @ w.T for w in weights]`` for float32 rows ``x`` [M, K], several weights of one
    format (bfloat16 MLX arrays [N_i, K], or MLX's affine quantized ``(weight, scales,
    biases)`` with ``group_size`` and ``bits``) in one pass of the few-row kernels (a
    layer's q, k and v, say).

    The weights' addresses are taken once (a decode step multiplies ~100 of them: taking
    them on every call cost 2 ms per step); the object holds the arrays, so the addresses
    stay valid for as long as it lives.
    """

    def __init__(self, weights, group_size: int = 0, bits: int = 0):
        quantized = bits != 0
        self._arrays = list(weights)  # keeps the buffers behind the addresses alive
        mats = [w[0] if quantized else w for w in weights]
        self.k = mats[0].shape[1] * (32 // bits if quantized else 1)
        ns = [w.shape[0] for w in mats]
        self.ns = (ctypes.c_int * len(ns))(*ns)
        self.group_size, self.bits = group_size, bits
        self.pointers = [_pointers(mats)]
        if quantized:
            self.pointers += [_pointers([w[1] for w in weights]), _pointers([w[2] for w in weights])]
            self.scales_bf16 = int(weights[0][1].itemsize == 2)

    def __call__(self, x: np.ndarray, integer: bool = True) -> list[np.ndarray]:
        x = _rows(x)
        m, k = x.shape
        if k != self.k:
            raise ValueError(f"rows of {k} values for weights of {self.k} columns")
        ys = [np.empty((m, n), np.float32) for n in self.ns]
        out = (ctypes.c_void_p * len(ys))(*(y.ctypes.data for y in ys))
        xp = x.ctypes.data_as(ctypes.c_void_p)
        if not self.bits:
            if _lib.mlx_voxtral_bf16mm(len(ys), m, self.ns, k, xp, self.pointers[0], out):
                raise MemoryError("no memory for a weight tile")
            return ys
        status = _lib.mlx_voxtral_qmm(len(ys), m, self.ns, k, self.group_size, self.bits, xp, *self.pointers,
                                      self.scales_bf16, int(integer), out)
        if status == 1:
            raise ValueError(f"no native kernel for {self.bits}-bit weights with group size {self.group_size}")
        if status:
            raise MemoryError("no memory for the quantized matmul's scratch")
        return ys


def bf16_matmuls(x: np.ndarray, weights) -> list[np.ndarray]:
    """``[x @ w.T for w in weights]`` for float32 rows ``x`` [M, K] and bfloat16 MLX weights
    [N_i, K], in one pass of the few-row kernels (a layer's q, k and v, say)."""
    return Matmuls(weights)(x)


def bf16_matmul(x: np.ndarray, weight) -> np.ndarray:
    """``x @ weight.T`` for float32 rows ``x`` [M, K] and a bfloat16 MLX ``weight`` [N, K]."""
    return bf16_matmuls(x, [weight])[0]


def quantized_matmuls(x: np.ndarray, layers, group_size: int, bits: int, integer: bool = True) -> list[np.ndarray]:
    """``quantized_matmul`` for several ``(weight, scales, biases)`` of one format at once:
    ``x`` is rounded once and the few-row kernels run in one pass."""
    return Matmuls(layers, group_size, bits)(x, integer)


def quantized_matmul(x: np.ndarray, weight, scales, biases, group_size: int, bits: int,
                     integer: bool = True) -> np.ndarray:
    """``x~ @ dequantize(weight).T`` for float32 rows ``x`` [M, K] and MLX's affine quantized
    ``weight``/``scales``/``biases`` (scales and biases bfloat16 or float32), where ``x~``
    is ``x`` rounded to 8 bits per group of ``group_size`` values (``quantize_activations``).
    ``integer=False`` keeps few rows on the float kernels (those of CPUs without VNNI)."""
    return quantized_matmuls(x, [(weight, scales, biases)], group_size, bits, integer)[0]


def quantize_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """What the quantized kernels multiply instead of ``x`` [..., K]: every group of
    ``group_size`` values rounded to ``d * round(x / d)``, ``d = max|x| / 127`` (float32
    arithmetic, rounding half to even), as in llama.cpp's Q8 and mistral.rs's CPU matmuls."""
    x = np.asarray(x, np.float32)
    g = x.reshape(*x.shape[:-1], -1, group_size)
    amax = np.abs(g).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(g * inv)
    return ((amax / np.float32(127)) * q).astype(np.float32).reshape(x.shape)


def quantized_supported(group_size: int, bits: int) -> bool:
    """Whether the native kernels handle this format (bits 4/8, groups of whole blocks)."""
    return bits in (4, 8) and group_size % (8 * (32 // bits)) == 0


def attention_supported(head_dim: int) -> bool:
    """Whether the native attention kernels (many queries, and one query over a bfloat16
    cache) handle this head size (a multiple of 16)."""
    return head_dim % 16 == 0


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
    """Sliding-window causal attention: float32 ``q`` [H, Sq, D], ``k``/``v`` [Hkv, Sk, D]
    (the queries are the last ``Sq`` keys' positions) -> ``[Sq, H * D]``."""
    q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
    h, sq, d = q.shape
    hkv, sk, _ = k.shape
    out = np.empty((sq, h * d), np.float32)
    pointers = [t.ctypes.data_as(ctypes.c_void_p) for t in (q, k, v, out)]
    status = _lib.mlx_voxtral_attention(h, hkv, sq, sk, d, min(window, sk), ctypes.c_float(scale), *pointers)
    if status == 1:
        raise ValueError(f"no native attention for {h} heads over {hkv}, {sq} queries, {sk} keys, head size {d}")
    if status:
        raise MemoryError("no memory for the attention scratch")
    return out


def silu_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``silu(a) * b`` for float32 arrays of one shape (the SwiGLU gate), on all cores."""
    a, b = (np.ascontiguousarray(t, dtype=np.float32) for t in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"silu_mul needs equal shapes, got {a.shape} and {b.shape}")
    y = np.empty_like(a)
    _lib.mlx_voxtral_silu_mul(ctypes.c_size_t(a.size), *(t.ctypes.data_as(ctypes.c_void_p) for t in (a, b, y)))
    return y


def attention_one(q: np.ndarray, k, v, n: int, scale: float) -> np.ndarray:
    """One query per head over a bfloat16 KV cache: float32 ``q`` [H, D]; ``k``/``v`` the
    cache's row-contiguous bfloat16 buffers [..., Hkv, capacity, D] (a ``HostKVCache``'s
    uint16 bits, or evaluated MLX arrays) of which the first ``n`` keys are used -> ``[H * D]``."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    h, d = q.shape
    hkv, capacity, _ = k.shape[-3:]
    if not 0 < n <= capacity:
        raise ValueError(f"{n} keys asked of a cache of {capacity}")
    out = np.empty(h * d, np.float32)
    status = _lib.mlx_voxtral_attention_one(h, hkv, n, capacity, d, ctypes.c_float(scale),
                                            q.ctypes.data_as(ctypes.c_void_p), _pointer(k), _pointer(v),
                                            out.ctypes.data_as(ctypes.c_void_p))
    if status == 1:
        raise ValueError(f"no native attention for {h} heads over {hkv}, {n} keys, head size {d}")
    if status:
        raise MemoryError("no memory for the attention scratch")
    return out


def read_sum(data: np.ndarray) -> float:
    """Sum a float32 array on all cores, reading it once (the read-bandwidth probe)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    return float(_lib.mlx_voxtral_read_sum(data.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(data.size)))
