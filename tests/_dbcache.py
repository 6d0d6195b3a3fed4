"""DBCache written by hand on a plain diffusers transformer, with forward hooks: the reference
that dcfx's transformer graphs are checked against (it shares no code with dcfx).

The first Fn blocks and the last Bn blocks run as usual. A pre-hook on block Fn keeps the
streams entering the middle (`hidden_states`, and `encoder_hidden_states` where the blocks
carry it), a pre-hook on block 0 the image stream entering the blocks. The middle's last block
has a forward hook: on a full step it keeps what the middle added to each stream (its output
minus what entered block Fn), on a shallow step it returns what entered block Fn plus the kept
(or extrapolated) residual in place of its output; the middle's work is thrown away.

The decision is `decide(step, signal)`, asked at block Fn; `signal` is what blocks 0..Fn-1
added to the image stream (First-Block-Cache's signal; None where block Fn takes joined
streams). Caches are kept per `key` (set it per
guidance call to keep cond and uncond apart). Not a test module (no `test_` prefix).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# The ModuleLists holding each family's blocks, in execution order.
BLOCK_LISTS = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "WanTransformer3DModel": ("blocks",),
}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    names = BLOCK_LISTS.get(type(model).__name__, ("transformer_blocks",))
    return [b for name in names for b in getattr(model, name)]


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


class HandCache:
    """DBCache by hand on `model` at cut (fn, bn) (module docstring). `forecast` k > 0: a
    shallow step's residual is the Lagrange extrapolation, in the timestep, through the last
    k + 1 full steps' residuals (fewer at the start of a generation)."""

    def __init__(self, model: nn.Module, fn: int, bn: int, decide: Callable[[int, torch.Tensor], bool],
                 forecast: int = 0):
        blocks = blocks_of(model)
        self.decide, self.forecast = decide, forecast
        self.step, self.key, self.timestep = 0, None, None
        self.kept: dict = {}  # key -> [(timestep, residuals)], newest last
        self.full, self.entering, self.image0 = True, None, None
        self.decisions: list[bool] = []
        self.handles = [
            blocks[0].register_forward_pre_hook(self._first, with_kwargs=True),
            blocks[fn].register_forward_pre_hook(self._enter, with_kwargs=True),
            blocks[len(blocks) - bn - 1].register_forward_hook(self._leave),
        ]

    def _first(self, module, args, kwargs):
        self.image0 = _argument(args, kwargs, "hidden_states", 0)

    def _enter(self, module, args, kwargs):
        hidden = _argument(args, kwargs, "hidden_states", 0)
        self.entering = (_argument(args, kwargs, "encoder_hidden_states", 1), hidden)
        same = hidden.shape == self.image0.shape  # else (Flux 2's joint stream) no image-stream signal
        self.full = self.decide(self.step, hidden - self.image0 if same else None)
        self.decisions.append(self.full)

    def _stream_inputs(self, output):
        """What entered the middle, per stream the middle's last block outputs."""
        encoder, hidden = self.entering
        if isinstance(output, tuple):  # (encoder_hidden_states, hidden_states)
            return (encoder, hidden)
        if output.shape[1] != hidden.shape[1]:  # Flux 2: text and image tokens joined since block Fn
            return (torch.cat([encoder, hidden], 1),)
        return (hidden,)

    def _leave(self, module, args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        inputs = self._stream_inputs(output)
        history = self.kept.setdefault(self.key, [])
        if self.full:
            residual = tuple(None if o is None else o - i for o, i in zip(outputs, inputs))
            history.append((self.timestep, residual))
            del history[: -(self.forecast + 1)]
            return None
        residual = self._residual(history)
        new = tuple(None if r is None else i + r for i, r in zip(inputs, residual))
        return new if isinstance(output, tuple) else new[0]

    def _residual(self, history):
        if not self.forecast or len(history) == 1:
            return history[-1][1]
        points = history[-(self.forecast + 1):]
        times = [t for t, _ in points]
        weights = []
        for j, tj in enumerate(times):
            w = 1.0
            for m, tm in enumerate(times):
                if m != j:
                    w *= (self.timestep - tm) / (tj - tm)
            weights.append(w)
        return tuple(
            None if points[0][1][s] is None else sum(w * p[1][s] for w, p in zip(weights, points))
            for s in range(len(points[0][1]))
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
