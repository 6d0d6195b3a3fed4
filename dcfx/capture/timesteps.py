"""Timesteps given as numbers: the tensor each diffusers model class makes of one.

As a tensor the timestep is a graph input instead of a constant baked into the capture, so a
new value costs no new capture; its dtype is the model class's own, so results are identical.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np
import torch
from torch import nn


def host_number(t: Any) -> int | float:
    """A timestep given as a number (Python or numpy, e.g. from `scheduler.timesteps.numpy()`)
    as a Python int or float, so numpy scalars capture and compare like Python numbers."""
    if isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_)):
        return operator.index(t)
    if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)):
        return float(t)
    raise TypeError(f"timestep must be a tensor or a real number (Python or numpy), got {type(t).__name__}")


# How each diffusers model class turns a timestep given as a number into a tensor:
# (dtype for a float, dtype for an int); "device" adjusts for devices without 64-bit types.
_TIMESTEP_KINDS = {
    "UNet1DModel": (torch.int64, torch.int64),
    "UNet2DModel": (torch.int64, torch.int64),  # a float is truncated: long, as diffusers does
    "Kandinsky3UNet": (torch.float32, torch.int32),
}
DEFAULT_TIMESTEP_KIND = (torch.float64, torch.int64)
_NO_64_BIT = ("mps", "npu", "neuron")  # devices diffusers gives 32-bit timesteps


def timestep_kind(module: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    for cls in type(module).__mro__:
        if cls.__name__ in _TIMESTEP_KINDS:
            return _TIMESTEP_KINDS[cls.__name__]
    return DEFAULT_TIMESTEP_KIND


def timestep_tensor(t: int | float, like: torch.Tensor | None,
                     kind: tuple[torch.dtype, torch.dtype] = DEFAULT_TIMESTEP_KIND) -> torch.Tensor:
    # The tensor the model class makes from a Python number, so results are identical; as a
    # tensor the timestep is a graph input instead of a constant baked into the capture.
    device = like.device if like is not None else None
    dtype = kind[0] if isinstance(t, float) else kind[1]
    if kind == DEFAULT_TIMESTEP_KIND and device is not None and device.type in _NO_64_BIT:
        dtype = torch.float32 if dtype == torch.float64 else torch.int32
    if dtype in (torch.int64, torch.int32) and isinstance(t, float):
        t = int(t)  # torch.tensor([500.7], dtype=long) truncates, as the model class's own does
    return torch.tensor([t], dtype=dtype, device=device)
