"""LoRA scales and other per-step floats as graph inputs.

Float values in `cross_attention_kwargs` and `added_cond_kwargs` (a LoRA scale schedule)
become 0-d float64 tensors, so a new value costs no new capture. diffusers reads the LoRA
scale in Python, so the export multiplies it into PEFT's layer scalings (`lora_scaled`) and
the graph scales the LoRA updates by its input. Where the U-Net branches on such a float
(PEFT does on its LoRA scale), the call is bound again with the floats as constants
(`binding.CallBinder.keep_floats`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

# Keyword arguments whose float values become graph inputs (per-step scalars: a LoRA scale).
LIFTED = ("cross_attention_kwargs", "added_cond_kwargs")
def lora_scale(attention: dict, module: nn.Module, like: torch.Tensor | None) -> dict:
    """`cross_attention_kwargs` with its LoRA scale as a graph input, or without it.

    diffusers reads the scale in Python (PEFT scales the adapter layers' `scaling` before
    the forward): without adapters it is ineffective, so it is dropped; with adapters it
    becomes a 0-d tensor that the export multiplies into the layers' scalings while it
    exports, so the graph scales the LoRA updates by its input, and a schedule of scales
    costs one export.
    """
    attention = dict(attention)
    scale = attention.pop("scale")
    if scale is not None and lora_layers(module):
        device = like.device if like is not None else None
        attention["scale"] = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64, device=device)
    return attention


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """PEFT's LoRA layers (a `scaling` dict per adapter) in `module`."""
    return [m for m in module.modules() if isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "lora_A")]


@contextlib.contextmanager
def lora_scaled(module: nn.Module, scale: torch.Tensor) -> Iterator[None]:
    """Multiply every LoRA layer's scalings by `scale` (a traced tensor) for one trace."""
    saved = [(m, dict(m.scaling)) for m in lora_layers(module)]
    try:
        for m, scaling in saved:
            for name, value in scaling.items():
                m.scaling[name] = value * scale
        yield
    finally:
        for m, scaling in saved:
            m.scaling.clear()
            m.scaling.update(scaling)


def lift_floats(value: dict, like: torch.Tensor | None) -> dict:
    """`value` with its float entries (nested too) as 0-d float64 tensors; itself if none."""
    out, changed = {}, False
    device = like.device if like is not None else None
    for k, v in value.items():
        if isinstance(v, float) or isinstance(v, np.floating):
            out[k], changed = torch.tensor(float(v), dtype=torch.float64, device=device), True
        elif isinstance(v, dict):
            new = lift_floats(v, like)
            out[k], changed = new, changed or new is not v
        else:
            out[k] = v
    return out if changed else value
