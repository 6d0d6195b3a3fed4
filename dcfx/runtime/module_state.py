"""Module state: what of a U-Net a capture bakes in, besides the call's signature.

- `param_fingerprint`: which parameter and buffer tensors, their dtypes, devices and shapes,
  and the training flag;
- `state_digest`: every submodule's scalar attributes (checked once per generation);
- `Watch`: a cheap digest of the attributes that change what a U-Net computes without
  touching its parameters (FreeU factors, attention processors and their scales, PEFT
  adapter scalings and switches), read at every step, so that a change made by a step
  callback takes effect at that very step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_fingerprint(module: nn.Module) -> tuple[tuple, tuple]:
    """(which tensors, their layout): parameters and buffers by name and identity, and the
    training flag, dtypes, devices and shapes.

    Not data pointers: graphs read the parameters through the same Parameter objects, so
    weights moved away and back (CPU offload) reuse that state's graphs.
    """
    tensors = (*module.named_parameters(), *module.named_buffers())
    identity = tuple((name, id(t)) for name, t in tensors)
    layout = (module.training,) + tuple((t.dtype, t.device, tuple(t.shape)) for _, t in tensors)
    return identity, layout


_SCALARS = (bool, int, float, str, type(None))
# nn.Module bookkeeping that the parameter fingerprint or nothing at all depends on.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _value(value: Any) -> Any:
    """A hashable stand-in for a module attribute's value; None: not state."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    if isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in value.values()):
        return tuple(sorted(value.items(), key=repr))
    if not isinstance(value, (torch.Tensor, nn.Module, dict, list, tuple)):
        return ("object", id(value))  # e.g. an attention processor object
    return _NOT_STATE


_NOT_STATE = object()


def state_digest(module: nn.Module) -> tuple:
    """The non-tensor state of every submodule a capture may have baked in."""
    out = []
    for name, m in module.named_modules():
        for key, value in m.__dict__.items():
            if key in _MODULE_INTERNALS:
                continue
            v = _value(value)
            if v is not _NOT_STATE:
                out.append((name, key, v))
    return tuple(out)


# Attributes that switch or scale what a U-Net computes without touching its parameters:
# FreeU's factors (on up blocks), attention processors (and, below, their own scalars, e.g.
# IP-Adapter's scale), PEFT adapters' scalings and switches.
_WATCHED = frozenset({
    "s1", "s2", "b1", "b2", "processor", "scaling", "_active_adapter", "_disable_adapters",
    "merged_adapters", "scale", "_lora_scale",
})


class Watch:
    """The watched attributes of one U-Net (found once per parameter set), read cheaply."""

    def __init__(self, unet: nn.Module, identity: tuple):
        self.identity = identity
        self._watched = [
            (m, sorted(k for k in m.__dict__ if k in _WATCHED)) for m in unet.modules()
            if any(k in _WATCHED for k in m.__dict__)
        ]
        # FreeU sets its factors on up blocks that did not have them before.
        self._freeu = list(getattr(unet, "up_blocks", ()))

    def digest(self) -> tuple:
        out = []
        for m, keys in self._watched:
            d = m.__dict__
            for k in keys:
                value = d.get(k)
                out.append(_value(value))
                if k == "processor" and value is not None:
                    out.append(tuple(_value(v) for v in vars(value).values()) if hasattr(value, "__dict__") else ())
        for block in self._freeu:
            d = block.__dict__
            out.append((d.get("s1"), d.get("s2"), d.get("b1"), d.get("b2")))
        return tuple(out)
