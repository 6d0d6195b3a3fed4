"""Call binding: one call's arguments, normalised, and its signature key.

The call is bound to the module's `forward` (positional or keyword), a timestep given as a
number becomes the tensor the model class would make of it (`timesteps.py`), a LoRA scale and
other floats of `cross_attention_kwargs` and `added_cond_kwargs` become 0-d tensors
(`lora.py`), and the arguments are flattened with torch's pytree. Tensor leaves are the
graph's inputs; all other leaves (flags, the argument structure) are constants of the graph
and part of the signature key, so a call that differs in any of them gets its own capture.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch_private import pytree
from .lora import LIFTED, lift_floats, lora_scale
from .timesteps import host_number, timestep_kind, timestep_tensor

# Marks where a tensor leaf goes among a call's constants (None is a real argument value).
TENSOR_LEAF = object()


@dataclass(frozen=True)
class Call:
    """One call's arguments, normalised: tensor leaves plus the hashable signature key."""

    tensors: tuple[torch.Tensor, ...]
    key: tuple
    spec: pytree.TreeSpec
    constants: tuple  # non-tensor leaves, TENSOR_LEAF where the leaf is a tensor
    timestep: Any  # the timestep argument: a tensor as passed, or a Python int/float
    return_dict: bool
    sample: Any = None  # the sample argument as passed
    conditioning: tuple[torch.Tensor, ...] = ()  # tensors identifying the call's stream
    timestep_index: int | None = None  # the timestep's position in `tensors`
    lifted: bool = False  # some float arguments are graph inputs (see the module docstring)


class CallBinder:
    """Normalises calls of one module's `forward` (done once per module, cheap per call)."""

    def __init__(self, module: nn.Module):
        self._name = type(module).__name__
        self._signature = inspect.signature(module.forward)
        params = list(self._signature.parameters.values())
        variadic = [
            ("*" if p.kind is inspect.Parameter.VAR_POSITIONAL else "**") + p.name
            for p in params if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if variadic:
            raise TypeError(
                f"dcfx needs a U-Net whose forward names its parameters, like diffusers' "
                f"UNet2DConditionModel; {self._name}.forward{self._signature} has "
                f"{', '.join(variadic)}"
            )
        names = [p.name for p in params]
        # The timestep is the second parameter of every diffusers U-Net (`timestep`).
        self._timestep_name = "timestep" if "timestep" in names else (names[1] if len(names) > 1 else None)
        timestep = self._signature.parameters.get(self._timestep_name)
        self.not_a_unet: str | None = None
        if timestep is None or isinstance(timestep.default, bool):
            # Said up front (`optimize` raises it), not as a confusing timestep or graph error
            # at the first call: e.g. nn.Linear, or a VAE (its second parameter is a flag).
            self.not_a_unet = (
                f"{self._name} is not a U-Net: dcfx needs a denoising U-Net called as "
                f"forward(sample, timestep, ...), like diffusers' UNet2DConditionModel; "
                f"{self._name}.forward{self._signature} takes no timestep"
            )
        self._has_return_dict = "return_dict" in names
        self._sample_name = names[0] if names else None
        self._module = module
        self._timestep_kind = timestep_kind(module)
        self._keep_floats: set[tuple] = set()  # lifted keys whose export needs the floats fixed

    def keep_floats(self, call: Call) -> None:
        """From now on, calls like `call` keep their float arguments as graph constants."""
        self._keep_floats.add(call.key)

    def bind(self, args: tuple, kwargs: dict) -> Call:
        call = self._bind(args, kwargs, lift=True)
        if call.lifted and call.key in self._keep_floats:
            call = self._bind(args, kwargs, lift=False)
        return call

    def _bind(self, args: tuple, kwargs: dict, lift: bool) -> Call:
        if self.not_a_unet:
            raise TypeError(self.not_a_unet)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self._name}.forward() {self._unexpected_keyword(kwargs) or e}") from None
        named = dict(bound.arguments)
        return_dict = bool(named.pop("return_dict", True)) if self._has_return_dict else False
        timestep = named.get(self._timestep_name)
        sample = named.get(self._sample_name)
        conditioning = conditioning_of(named, self._sample_name, self._timestep_name)
        if self._timestep_name in named and not isinstance(timestep, torch.Tensor):
            timestep = host_number(timestep)
            named[self._timestep_name] = timestep_tensor(timestep, first_tensor(named), self._timestep_kind)
        lifted = False
        attention = named.get("cross_attention_kwargs")
        if isinstance(attention, dict) and "scale" in attention:
            named["cross_attention_kwargs"] = attention = lora_scale(attention, self._module, first_tensor(named))
        if lift:
            for name in LIFTED:
                value = named.get(name)
                if isinstance(value, dict):
                    new = lift_floats(value, first_tensor(named))
                    if new is not value:
                        named[name], lifted = new, True
        leaves, spec = pytree.tree_flatten(named)
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        constants = tuple(TENSOR_LEAF if isinstance(x, torch.Tensor) else x for x in leaves)
        key = (spec, tuple(_leaf_key(x) for x in leaves), _autocast_state(tensors))
        timestep_index = None
        step_tensor = named.get(self._timestep_name)
        if isinstance(step_tensor, torch.Tensor):
            timestep_index = next((i for i, x in enumerate(tensors) if x is step_tensor), None)
        return Call(tensors, key, spec, constants, timestep, return_dict, sample, conditioning, timestep_index, lifted)

    def _unexpected_keyword(self, kwargs: dict) -> str | None:
        """Named first, as Python does, with the parameter a misspelling probably means."""
        names = list(self._signature.parameters)
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; its parameters are {', '.join(names)}"
                return f"got an unexpected keyword argument {key!r}{hint}"
        return None


def _autocast_state(tensors: tuple) -> Any:
    # Export bakes autocast's casts into the graph, so they are part of the signature.
    device_type = tensors[0].device.type if tensors else "cpu"
    try:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        return None


def first_tensor(named: dict) -> torch.Tensor | None:
    for leaf in pytree.tree_leaves(named):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


# Arguments that change every step by design: not part of a call's stream (its conditioning).
PER_STEP_ARGUMENTS = frozenset(
    {"down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"}
)


def conditioning_of(named: dict[str, Any], sample_name: str | None, timestep_name: str | None) -> tuple[torch.Tensor, ...]:
    """The tensors that identify a call's stream: every tensor argument but the sample, the
    timestep and the per-step residuals (ControlNet's)."""
    out: list[torch.Tensor] = []
    for name, value in named.items():
        if name in (sample_name, timestep_name) or name in PER_STEP_ARGUMENTS:
            continue
        _collect_tensors(value, out)
    return tuple(out)


def _collect_tensors(obj: Any, out: list[torch.Tensor]) -> None:
    # Not torch's pytree: this runs per call, and U-Net arguments nest only in dicts and tuples.
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _collect_tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect_tensors(x, out)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device)
    try:
        hash(x)
    except TypeError:
        return ("C", type(x).__name__, repr(x))
    return ("C", type(x).__name__, x)
