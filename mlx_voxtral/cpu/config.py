"""The CPU backend's switches, all read here.

* ``MLX_VOXTRAL_BLAS``: the BLAS library the kernels call (a name ``dlopen`` finds, or a
  path); default: the system's OpenBLAS (``libopenblas0-pthread``), BLIS or MKL, first found.
* ``CC``: the C compiler that builds the kernels (default ``cc``, then ``gcc``).

Which backend a model uses is ``load(..., backend=)`` or ``MLX_VOXTRAL_BACKEND``
(``mlx_voxtral.loader.resolve_backend``).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional


def blas() -> Optional[str]:
    return os.environ.get("MLX_VOXTRAL_BLAS") or None


def compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def platform_supported() -> bool:
    return sys.platform.startswith("linux")
