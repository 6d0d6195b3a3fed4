"""The forecast's host side: how a full step updates what a shallow step extrapolates from.

`passes.forecast` makes the shallow graph read, besides the last full step's feature `c0`,
the features of the `order` full steps before it (`c1`, `c2`) and a float32 vector
`times = [n, t0, t1, ...]`: how many of them are valid in this generation, and their
timesteps. A full step shifts them back by one and counts itself or, first in its generation,
starts the count over. Everything is written in place on the device and decided on the host,
so a captured CUDA graph that reads these tensors stays valid.
"""

from __future__ import annotations

import torch


def new_history(feature: torch.Tensor, order: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed history buffers (`order` features like `feature`) and `times`, allocated once.

    Zeros, not empty memory: an invalid entry is weighted by 0 in the graph, and 0 * NaN
    would still be NaN.
    """
    with torch.inference_mode(False):  # normal tensors: later calls outside inference mode write them
        history = [torch.zeros_like(feature) for _ in range(order)]
        times = torch.zeros(order + 2, dtype=torch.float32, device=feature.device)
    return history, times


def remember(history: list[torch.Tensor], last: torch.Tensor, times: torch.Tensor, restart: bool,
             timestep: torch.Tensor | None) -> None:
    """Before a full step overwrites `last` (the previous full step's feature): shift it into
    `history`, or with `restart` start the count over, and record the step's timestep."""
    order = len(history)
    with torch.no_grad():
        if restart:
            times[0].fill_(1)
        else:
            for older, newer in zip(reversed(history), reversed([last, *history[:-1]])):
                older.copy_(newer)
            times[2:].copy_(times[1:-1].clone())
            times[0].add_(1).clamp_(max=order + 1)
        if timestep is not None:
            times[1].copy_(timestep.reshape(-1)[0])
