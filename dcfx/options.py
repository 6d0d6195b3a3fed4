"""Options made from a config and the environment: the one module that reads dcfx's
environment variables, when options are made; passes and compile take them as arguments.

- `DCFX_DISABLE_FUSION=1`: the passes leave the cut unfused, whatever `fuse_cut` says (read
  whenever a call signature's graphs are built);
- `DCFX_INDUCTOR_TWINS=1`: a graph compiled for CUDA calls the cut ops' `triton_op` twins,
  whose Triton kernels inductor sees (read whenever a graph is compiled). Off by default: on
  CUDA the default keeps the opaque custom op, which compiles and runs everywhere, until
  `tests/test_kernel_ops.py`'s twin test passes on a GPU.
"""

from __future__ import annotations

import os

from .config import DeepCacheConfig
from .passes import PassOptions


def fusion_disabled() -> bool:
    return os.environ.get("DCFX_DISABLE_FUSION", "0") == "1"


def inductor_twins() -> bool:
    return os.environ.get("DCFX_INDUCTOR_TWINS", "0") == "1"


def pass_options(config: DeepCacheConfig, timestep_index: int | None = None) -> PassOptions:
    """What the passes make of a captured call under `config`; `timestep_index` is the
    timestep's position among the call's tensors (a forecast reads it)."""
    fuse = config.fuse_cut and not fusion_disabled()
    blocks = None if config.first_blocks is None else (config.first_blocks, config.last_blocks or 0)
    return PassOptions(config.branch, fuse, config.forecast, config.needs_head, timestep_index, blocks)
