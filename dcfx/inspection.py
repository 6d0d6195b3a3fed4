"""Inspection: the two graphs dcfx runs for one call, as `DeepCacheUNet.graphs(...)` returns them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import fx


@dataclass(frozen=True)
class DeepCacheGraphs:
    """The full and the shallow graph for one call (module state and input signature).

    Both are flat GraphModules over the U-Net's own weights (no copies): `full(*inputs)`
    returns the U-Net's output leaves followed by the `num_cached` cached tensors;
    `shallow(*inputs, *cached)` returns the output leaves (rebuilt with `out_spec`).
    """

    full: fx.GraphModule
    shallow: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]  # the call's tensors, in placeholder order
    num_cached: int
    branch: int
    out_spec: pytree.TreeSpec
    key: tuple  # the input signature key (packages record it)
    signature: str  # the input signature in words
