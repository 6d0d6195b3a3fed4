"""`python -m dcfx` is the `dcfx` console script."""

import sys

from .cli import main

# benchmarks/bench_e2e.py imports the example's model builder from here.
from .example import build_unet  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
