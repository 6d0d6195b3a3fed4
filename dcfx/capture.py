"""Capture: a U-Net plus one call's arguments -> an FX graph over the call's tensors.

The call is normalised (positional or keyword, Python-number timestep or tensor), flattened
with torch's pytree, and exported with `torch.export`. The graph takes the call's tensor
leaves as placeholders, in flattening order, and returns the output's tensor leaves; all
non-tensor values (flags, `cross_attention_kwargs` numbers, the argument structure) are
constants of the graph and part of the signature key, so a call that differs in any of
them gets its own capture. Weights stay the module's own tensors (`get_attr`, no copy).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

_UNET_PREFIX = "unet."
# Marks where a tensor leaf goes among a call's constants (None is a real argument value).
TENSOR_SLOT = object()


@dataclass(frozen=True)
class Call:
    """One call's arguments, normalised: tensor leaves plus the hashable signature key."""

    tensors: tuple[torch.Tensor, ...]
    key: tuple
    spec: pytree.TreeSpec
    constants: tuple  # non-tensor leaves, TENSOR_SLOT where the leaf is a tensor
    timestep: Any  # the timestep argument as passed (number or tensor)
    return_dict: bool


@dataclass
class Capture:
    """An exported call: `graph_module(*tensors)` returns the output's tensor leaves."""

    graph_module: torch.fx.GraphModule
    out_spec: pytree.TreeSpec


class CallBinder:
    """Normalises calls of one module's `forward` (done once per module, cheap per call)."""

    def __init__(self, module: nn.Module):
        self._signature = inspect.signature(module.forward)
        variadic = [
            p.name for p in self._signature.parameters.values()
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if variadic:
            hint = (
                " (a torch.compile'd module: pass the original, `model._orig_mod`, and use "
                "compile=True)" if hasattr(module, "_orig_mod") else ""
            )
            raise TypeError(
                f"dcfx needs a U-Net whose forward names its parameters, like diffusers' "
                f"UNet2DConditionModel; {type(module).__name__}.forward{self._signature} has "
                f"{', '.join('*' + n for n in variadic)}{hint}"
            )
        names = list(self._signature.parameters)
        # The timestep is the second parameter of every diffusers U-Net (`timestep`).
        self._timestep_name = "timestep" if "timestep" in names else (names[1] if len(names) > 1 else None)
        self._has_return_dict = "return_dict" in names

    def bind(self, args: tuple, kwargs: dict) -> Call:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"arguments do not match the U-Net's forward{self._signature}: {e}") from None
        named = dict(bound.arguments)
        return_dict = bool(named.pop("return_dict", True)) if self._has_return_dict else False
        timestep = named.get(self._timestep_name) if self._timestep_name else None
        if self._timestep_name in named and not isinstance(timestep, torch.Tensor):
            named[self._timestep_name] = _timestep_tensor(timestep, _first_tensor(named))
        leaves, spec = pytree.tree_flatten(named)
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        constants = tuple(TENSOR_SLOT if isinstance(x, torch.Tensor) else x for x in leaves)
        key = (spec, tuple(_leaf_key(x) for x in leaves), _autocast_state(tensors))
        return Call(tensors, key, spec, constants, timestep, return_dict)


def _autocast_state(tensors: tuple) -> Any:
    # Export bakes autocast's casts into the graph, so they are part of the signature.
    device_type = tensors[0].device.type if tensors else "cpu"
    try:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        return None


def _first_tensor(named: dict) -> torch.Tensor | None:
    for leaf in pytree.tree_leaves(named):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _timestep_tensor(t: Any, like: torch.Tensor | None) -> torch.Tensor:
    # Same tensor diffusers makes from a Python number, so results are identical; as a
    # tensor the timestep is a graph input instead of a constant baked into the capture.
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"timestep must be a tensor or a Python number, got {type(t).__name__}")
    device = like.device if like is not None else None
    if isinstance(t, float):
        dtype = torch.float32 if device is not None and device.type in ("mps", "npu") else torch.float64
    else:
        dtype = torch.int64
    return torch.tensor([t], dtype=dtype, device=device)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device)
    try:
        hash(x)
    except TypeError:
        return ("C", type(x).__name__, repr(x))
    return ("C", type(x).__name__, x)


class _Adapter(nn.Module):
    """Exports the U-Net as a function of the call's tensor leaves only."""

    def __init__(self, unet: nn.Module, call: Call):
        super().__init__()
        self.unet = unet
        self._spec = call.spec
        self._constants = call.constants
        self._has_return_dict = "return_dict" in inspect.signature(unet.forward).parameters

    def forward(self, *tensors: torch.Tensor):
        it = iter(tensors)
        leaves = [next(it) if c is TENSOR_SLOT else c for c in self._constants]
        named = pytree.tree_unflatten(leaves, self._spec)
        if self._has_return_dict:
            # The output object (e.g. UNet2DConditionOutput) is a pytree node, so its class
            # lands in the out spec; the runtime turns it into a tuple for return_dict=False.
            named["return_dict"] = True
        return self.unet(**named)


def capture(unet: nn.Module, call: Call) -> Capture:
    """Export `unet` for this call. The graph shares the module's parameters and buffers."""
    adapter = _Adapter(unet, call)
    with torch.no_grad():
        ep = torch.export.export(adapter, call.tensors, strict=False)
    gm = ep.module()
    # Flat positional inputs and a flat output tuple: the runtime owns the pytree handling,
    # and the passes may append inputs/outputs.
    gm.graph._codegen = torch.fx.graph.CodeGen()
    # Export's dtype/device assertions are side effects that would keep the deep path alive
    # in the shallow graph; the signature key already pins what they check.
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)):
        gm.graph.erase_node(node)
    for hook_dict in (gm._forward_pre_hooks, gm._forward_hooks):
        hook_dict.clear()
    gm.recompile()
    return Capture(gm, ep.call_spec.out_spec)


def module_path(node: torch.fx.Node) -> str:
    """The U-Net module path a node was traced in ('' for the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("self.")
    return path[len(_UNET_PREFIX):] if path.startswith(_UNET_PREFIX) else ("" if path == "unet" else path)


def unflatten_output(out: tuple, out_spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten(list(out), out_spec)

