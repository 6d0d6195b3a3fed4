"""FLOPs of a graph, counted without computing: its inputs and weights as meta tensors.

`torch.utils.flop_counter.FlopCounterMode` counts matrix products, convolutions and attention
(what dominates a U-Net); elementwise work is not counted. `dcfx.report` and the runtime's
`DeepCacheUNet.spent` use the same counter, so their numbers agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode


class _OnMeta(fx.Interpreter):
    """Runs a graph with its weights read as meta tensors (no data, no compute)."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Factories with a device baked in at capture (arange for the time embedding, ...).
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("meta")}
        return super().call_function(target, args, kwargs)


def count_flops(gm: fx.GraphModule, inputs: tuple) -> tuple[int, tuple]:
    """(FLOPs of one call of `gm`, its outputs as meta tensors)."""
    metas = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outputs = _OnMeta(gm).run(*metas)
    return counter.get_total_flops(), tuple(outputs)
