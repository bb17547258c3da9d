"""``python -m mlx_voxtral``: the ``mlx-voxtral`` command."""

import sys

from .cli import main

sys.exit(main())
