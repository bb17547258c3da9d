"""The CPU backend's native code: mlx_voxtral's C kernels and the system BLAS they call.

MLX's Linux CPU wheel links the reference BLAS, its own bfloat16 and quantized CPU matmuls
are scalar loops, and its attention and elementwise ops run on one core; the kernels here
multiply float32, bfloat16 and MLX's 4/8-bit weights with float32 rows, attend over sliding
windows and gate SwiGLU on all cores (their measured speeds are in BENCHMARKS.md).

``load()`` (called when a model is loaded with the CPU backend, never at import) compiles
``native.c`` once with the system C compiler (cached under ``~/.cache/mlx_voxtral``, keyed by
source and CPU), loads it privately (``RTLD_LOCAL``) and has it open the system BLAS privately
too: the kernels call the BLAS themselves, nothing is put under MLX, so the order in which
``mlx`` and ``mlx_voxtral`` are imported changes nothing. The switches are parsed in
``mlx_voxtral.cpu.config``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from . import config

_CANDIDATES = [
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libblis.so.4",
    "libmkl_rt.so.2",
]
_SOURCE = Path(__file__).with_name("native.c")

FEW_ROWS = 8  # the native kernels' row limit (FEW_ROWS in native.c)
MANY_ROWS = 64  # beyond it, quantized weights take the many-row kernels (MANY_ROWS in native.c)

blas: Optional[str] = None  # the BLAS the kernels call, once loaded
library: Optional[str] = None  # the compiled native library, once loaded
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_lock = threading.Lock()


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


def _build() -> Path:
    """Compile native.c with OpenMP once per source, CPU and compiler (cached)."""
    compiler = config.compiler()
    if compiler is None:
        raise OSError("no C compiler (set CC, or install gcc)")
    source = _SOURCE.read_text()
    digest = hashlib.sha256((source + _cpu_id() + compiler).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "native.so"
        flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
        proc = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(_SOURCE), "-ldl", "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise OSError(f"compiling native.c failed: {proc.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent first runs never see half a file
    return target


_PROBE = """
import ctypes, json, sys
for name in sys.argv[1:]:
    try:
        lib = ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL)
    except OSError:
        continue
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
    except AttributeError:
        core = None
    print(json.dumps([name, core]))
    break
"""
# OpenBLAS kernels for CPUs with AVX2/FMA and with AVX-512 (names openblas_get_corename gives)
_AVX2_CORES = {"Haswell", "Skylake", "SkylakeX", "Cooperlake", "SapphireRapids", "Zen"}
_AVX512_CORES = {"SkylakeX", "Cooperlake", "SapphireRapids"}


def _find_blas() -> tuple[str, dict]:
    """The first BLAS that loads (the one named by the switch, else the usual ones), and the
    environment to load it with.

    OpenBLAS picks its kernels from the CPU's model number when it loads; a release older than
    the CPU falls back to generic ones (Debian 12's 0.3.21 on a Zen 4 EPYC picks "Prescott",
    a fifth of its SkylakeX kernels' speed: BENCHMARKS.md). The library is probed in a
    subprocess (a probe here would fix the choice for this process) and, when it would fall
    back although the CPU has AVX2 or AVX-512, loaded with ``OPENBLAS_CORETYPE`` naming those
    kernels (a user's own ``OPENBLAS_CORETYPE`` wins).
    """
    choice = config.blas()
    found = ctypes.util.find_library("openblas")
    candidates = [choice] if choice else _CANDIDATES + ([found] if found else [])
    key = hashlib.sha256(("\0".join(candidates) + _cpu_id()).encode()).hexdigest()[:16]
    cached = _cache_dir() / f"blas-{key}.json"
    try:
        name, core = json.loads(cached.read_text())
    except (OSError, ValueError):
        proc = subprocess.run([sys.executable, "-c", _PROBE, *candidates], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise OSError(f"no BLAS library found (tried {', '.join(candidates)}; install libopenblas0-pthread)")
        name, core = json.loads(proc.stdout.strip().splitlines()[-1])
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps([name, core]))
    env = {}
    if core is not None and "OPENBLAS_CORETYPE" not in os.environ:
        flags = set(" ".join(line.split(":", 1)[1] for line in _cpu_id().splitlines() if line.startswith("flags")).split())
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags and core not in _AVX512_CORES | {"Zen"}:
            env["OPENBLAS_CORETYPE"] = "SkylakeX"
        elif {"avx2", "fma"} <= flags and core not in _AVX2_CORES:
            env["OPENBLAS_CORETYPE"] = "Haswell"
    return name, env


@contextlib.contextmanager
def _environment(values: dict):
    """``values`` in the environment for the moment a library loads (and reads them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


# libgomp's spin count for idle threads (3000 and 20000 measured, BENCHMARKS.md): long enough
# to bridge most of the Python between a decode step's kernels, short enough not to hold a
# core through the BLAS call after a kernel.
SPIN_COUNT = "20000"


@contextlib.contextmanager
def _short_spin_openmp():
    """Load OpenMP with idle threads that spin briefly, then sleep.

    The kernels' OpenMP threads and OpenBLAS's own threads take turns on the same cores:
    spinning for long steals a core from the BLAS call that follows, sleeping at once makes
    every kernel wait for its threads to wake; a short spin avoids both. libgomp reads the
    settings once, when it loads, so the variables are set only for that moment
    (OMP_WAIT_POLICY=passive for other OpenMP runtimes). A user's own OMP_WAIT_POLICY or
    GOMP_SPINCOUNT wins.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ.update(OMP_WAIT_POLICY="passive", GOMP_SPINCOUNT=SPIN_COUNT)
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]


def load() -> bool:
    """Build and load the kernels and their BLAS (once); False, with ``error()`` saying why,
    where they cannot be had (not Linux, no compiler, no BLAS, no OpenMP)."""
    global blas, library, _lib, _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib is not None
        try:
            if not config.platform_supported():
                raise OSError("the CPU backend runs on Linux only")
            name, env = _find_blas()
            path = _build()
            with _short_spin_openmp():
                lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
            with _environment(env):
                status = lib.mlx_voxtral_blas_init(name.encode())
            if status != 0:
                raise OSError(f"{name} has no cblas_sgemm/cblas_sgemv")
            if not lib.mlx_voxtral_kernels():
                raise OSError("the kernels were built without OpenMP")
            lib.mlx_voxtral_read_sum.restype = ctypes.c_float
        except (OSError, subprocess.SubprocessError) as e:
            _error = str(e)
            return False
        blas, library, _lib = name, str(path), lib
        return True


def error() -> Optional[str]:
    """Why ``load`` failed, if it did."""
    return _error


def kernels_available() -> bool:
    """True when the kernels are loaded (``load`` succeeded)."""
    return _lib is not None


def _pointer(array) -> ctypes.c_void_p:
    """Address of an evaluated, row-contiguous MLX array's data (any dtype, no copy)."""
    return ctypes.c_void_p(np.frombuffer(memoryview(array).cast("B"), np.uint8).ctypes.data)


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _pointers(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * len(arrays))(*(_pointer(a) for a in arrays))


class Matmuls:
    """``[x @ w.T for w in weights]`` for float32 rows ``x`` [M, K], several weights of one
    format (float32 or bfloat16 MLX arrays [N_i, K], or MLX's affine quantized ``(weight,
    scales, biases)`` with ``group_size`` and ``bits``) in one pass of the few-row kernels (a
    layer's q, k and v, say).

    The weights' addresses are taken once (a decode step multiplies ~100 of them); the object
    holds the arrays, so the addresses stay valid for as long as it lives.

    ``many``: quantized weights take the many-row integer kernel whatever the number of rows
    (where the CPU has AVX-512 VNNI or AVX2), so that a row's result does not depend on how many rows a call
    brings (the encoder's: streamed audio in 80 ms steps equals one offline block); otherwise
    up to ``MANY_ROWS`` rows take the few-row kernels, which stream the weights once. The
    first call of such a product with up to ``MANY_ROWS`` rows lays its weights out in the
    kernel's tiles once (a second copy: the weights' size plus their scales and biases, kept
    for as long as the object lives), and every later call reads those instead of transposing
    the weights again: for a few rows the transposes cost more than the products. The tiles
    hold the same values in the same order, so the results are the same bits.
    """

    def __init__(self, weights, group_size: int = 0, bits: int = 0, many: bool = False):
        self.many = many
        quantized = bits != 0
        self._arrays = list(weights)  # keeps the buffers behind the addresses alive
        mats = [w[0] if quantized else w for w in weights]
        self.k = mats[0].shape[1] * (32 // bits if quantized else 1)
        ns = [w.shape[0] for w in mats]
        self.ns = (ctypes.c_int * len(ns))(*ns)
        self.group_size, self.bits = group_size, bits
        self.pointers = [_pointers(mats)]
        self.f32 = not quantized and mats[0].itemsize == 4
        if quantized:
            self.pointers += [_pointers([w[1] for w in weights]), _pointers([w[2] for w in weights])]
            self.scales_bf16 = int(weights[0][1].itemsize == 2)
        self._tiles: Optional[list] = None  # the weights in the integer tiles' layout, once laid out
        self._tile_pointers = [None, None]
        self._tiles_lock = threading.Lock()

    def _lay_out_tiles(self) -> None:
        """Lay the quantized weights out in the many-row integer kernel's tiles (where the CPU
        has AVX-512 VNNI or AVX2 and the format is taken; otherwise nothing changes)."""
        with self._tiles_lock:
            if self._tiles is not None:
                return
            g, bits, k = self.group_size, self.bits, self.k
            cols = _lib.mlx_voxtral_qg_pack(0, k, g, bits, None, None, None, 0, None, None)
            tiles = []
            if cols:
                for n, w, s, b in zip(self.ns, *self.pointers):
                    count = -(-n // cols)
                    wt = np.empty(count * cols * k * bits // 32, np.uint32)
                    st = np.empty(count * cols * (k // g) * 2, np.uint16 if self.scales_bf16 else np.float32)
                    _lib.mlx_voxtral_qg_pack(n, k, g, bits, ctypes.c_void_p(w), ctypes.c_void_p(s),
                                             ctypes.c_void_p(b), self.scales_bf16,
                                             wt.ctypes.data_as(ctypes.c_void_p), st.ctypes.data_as(ctypes.c_void_p))
                    tiles.append((wt, st))
                self._tile_pointers = [(ctypes.c_void_p * len(tiles))(*(t.ctypes.data for t, _ in tiles)),
                                       (ctypes.c_void_p * len(tiles))(*(s.ctypes.data for _, s in tiles))]
            self._tiles = tiles

    @property
    def tiles_nbytes(self) -> int:
        """Bytes of the tiled copy of the weights (0 until one is laid out)."""
        return sum(t.nbytes + s.nbytes for t, s in self._tiles or [])

    def __call__(self, x: np.ndarray, integer: bool = True) -> list[np.ndarray]:
        x = _rows(x)
        m, k = x.shape
        if k != self.k:
            raise ValueError(f"rows of {k} values for weights of {self.k} columns")
        ys = [np.empty((m, n), np.float32) for n in self.ns]
        out = (ctypes.c_void_p * len(ys))(*(y.ctypes.data for y in ys))
        xp = x.ctypes.data_as(ctypes.c_void_p)
        if self.f32:
            _lib.mlx_voxtral_f32mm(len(ys), m, self.ns, k, xp, self.pointers[0], out)
            return ys
        if not self.bits:
            if _lib.mlx_voxtral_bf16mm(len(ys), m, self.ns, k, xp, self.pointers[0], out):
                raise MemoryError("no memory for a weight tile")
            return ys
        if self.many and integer and m <= MANY_ROWS and self._tiles is None:
            self._lay_out_tiles()
        status = _lib.mlx_voxtral_qmm(len(ys), m, self.ns, k, self.group_size, self.bits, xp, *self.pointers,
                                      self.scales_bf16, int(integer), int(self.many), *self._tile_pointers, out)
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
    ``integer=False`` keeps few rows on the float kernels (those of CPUs without AVX2)."""
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


def _kv_rows(x: np.ndarray) -> np.ndarray:
    """``x`` [Hkv, S, D] as float32 or bfloat16 bits (uint16) whose positions are rows of D
    contiguous values, D apart (heads may lie further apart): no copy when it is already so."""
    if x.dtype not in (np.float32, np.uint16):
        x = x.astype(np.float32)
    item = x.itemsize
    if x.strides[2] != item or x.strides[1] != x.shape[2] * item or x.strides[0] % item or x.strides[0] < 0:
        x = np.ascontiguousarray(x)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
    """Sliding-window causal attention: float32 ``q`` [H, Sq, D] over keys and values
    ``k``/``v`` [Hkv, Sk, D] (the queries are the last ``Sq`` keys' positions) -> ``[Sq, H * D]``.

    ``k`` and ``v`` are float32, or bfloat16 bits (uint16, both alike); they are read in place
    where each position's D values are contiguous and positions D apart (a view of a
    ``HostKVCache``'s buffer, whose heads lie its capacity apart), copied otherwise. A query's
    result depends only on its own keys, never on the other queries of the call."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    k, v = _kv_rows(k), _kv_rows(v)
    if k.dtype != v.dtype or k.shape != v.shape:
        raise ValueError(f"keys {k.dtype} {k.shape} and values {v.dtype} {v.shape} differ")
    h, sq, d = q.shape
    hkv, sk, _ = k.shape
    out = np.empty((sq, h * d), np.float32)
    ld = [ctypes.c_size_t(t.strides[0] // t.itemsize) for t in (k, v)]
    status = _lib.mlx_voxtral_attention(h, hkv, sq, sk, d, min(window, sk), ctypes.c_float(scale),
                                        q.ctypes.data_as(ctypes.c_void_p), int(k.dtype == np.uint16),
                                        k.ctypes.data_as(ctypes.c_void_p), ld[0],
                                        v.ctypes.data_as(ctypes.c_void_p), ld[1],
                                        out.ctypes.data_as(ctypes.c_void_p))
    if status == 1:
        raise ValueError(f"no native attention for {h} heads over {hkv}, {sq} queries, {sk} keys, head size {d}")
    if status:
        raise MemoryError("no memory for the attention scratch")
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU ``x (1 + erf(x / sqrt 2)) / 2`` of a float32 array, as MLX's
    ``nn.gelu`` computes it (to float32 rounding), on all cores."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    _lib.mlx_voxtral_gelu(ctypes.c_size_t(x.size), x.ctypes.data_as(ctypes.c_void_p),
                          y.ctypes.data_as(ctypes.c_void_p))
    return y


def silu_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``silu(a) * b`` for float32 arrays of one shape (the SwiGLU gate), on all cores."""
    a, b = (np.ascontiguousarray(t, dtype=np.float32) for t in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"silu_mul needs equal shapes, got {a.shape} and {b.shape}")
    y = np.empty_like(a)
    _lib.mlx_voxtral_silu_mul(ctypes.c_size_t(a.size), *(t.ctypes.data_as(ctypes.c_void_p) for t in (a, b, y)))
    return y


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE on interleaved pairs (MLX's ``traditional=True``) of float32 ``x`` [rows, heads, D]
    at each row's angles, float32 ``cos``/``sin`` [rows, D / 2]: ``x[2i] c - x[2i+1] s``,
    ``x[2i] s + x[2i+1] c``, every product rounded as numpy rounds it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, heads, d = x.shape
    cos, sin = (np.ascontiguousarray(t, dtype=np.float32) for t in (cos, sin))
    if d % 2 or cos.shape != (rows, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"angles {cos.shape} for rows {x.shape}")
    y = np.empty_like(x)
    _lib.mlx_voxtral_rope(ctypes.c_size_t(rows), heads, d, *(ctypes.c_void_p(t.ctypes.data) for t in (x, cos, sin, y)))
    return y


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, scale: Optional[np.ndarray] = None) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` for float32 rows ``x`` [rows, K] and ``weight``
    [K], then times ``scale`` ([K] for every row, or [rows, K]) where given; a row's result
    is the same whatever the other rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.shape
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.shape != (k,):
        raise ValueError(f"a norm of {weight.shape} for rows of {k}")
    ld = 0
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if scale.shape not in ((k,), (rows, k)):
            raise ValueError(f"a scale of {scale.shape} for rows {x.shape}")
        ld = k if scale.ndim == 2 else 0
    y = np.empty_like(x)
    p = [None if t is None else ctypes.c_void_p(t.ctypes.data) for t in (x, weight, scale, y)]
    _lib.mlx_voxtral_rms_norm(ctypes.c_size_t(rows), k, p[0], p[1], ctypes.c_float(eps), p[2], ctypes.c_size_t(ld), p[3])
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
