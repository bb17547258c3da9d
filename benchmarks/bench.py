#!/usr/bin/env python
"""Benchmark script; see ``mlx_voxtral/bench.py`` (also ``mlx-voxtral bench``)."""

import sys

from mlx_voxtral.bench import main

if __name__ == "__main__":
    sys.exit(main())
