"""Capture: a U-Net plus one call's arguments -> an FX graph over the call's tensors.

The call is normalised (positional or keyword, Python-number timestep or tensor), flattened
with torch's pytree, and exported with `torch.export`. The graph takes the call's tensor
leaves as placeholders, in flattening order, and returns the output's tensor leaves; all
non-tensor values (flags, `cross_attention_kwargs` numbers, the argument structure) are
constants of the graph and part of the signature key, so a call that differs in any of
them gets its own capture. Weights stay the module's own tensors (`get_attr`, no copy).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import _torch_private as _private
from ._torch_private import pytree

UNET_PREFIX = "unet."  # the adapter holds the U-Net as `unet`: module paths start so
# Marks where a tensor leaf goes among a call's constants (None is a real argument value).
TENSOR_SLOT = object()


@dataclass(frozen=True)
class Call:
    """One call's arguments, normalised: tensor leaves plus the hashable signature key."""

    tensors: tuple[torch.Tensor, ...]
    key: tuple
    spec: pytree.TreeSpec
    constants: tuple  # non-tensor leaves, TENSOR_SLOT where the leaf is a tensor
    timestep: Any  # the timestep argument: a tensor as passed, or a Python int/float
    return_dict: bool


@dataclass
class Capture:
    """An exported call: `graph_module(*tensors)` returns the output's tensor leaves."""

    graph_module: torch.fx.GraphModule
    out_spec: pytree.TreeSpec


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

    def bind(self, args: tuple, kwargs: dict) -> Call:
        if self.not_a_unet:
            raise TypeError(self.not_a_unet)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self._name}.forward() {self._unexpected_keyword(kwargs) or e}") from None
        named = dict(bound.arguments)
        return_dict = bool(named.pop("return_dict", True)) if self._has_return_dict else False
        timestep = named.get(self._timestep_name)
        if self._timestep_name in named and not isinstance(timestep, torch.Tensor):
            timestep = _host_number(timestep)
            named[self._timestep_name] = _timestep_tensor(timestep, _first_tensor(named))
        leaves, spec = pytree.tree_flatten(named)
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        constants = tuple(TENSOR_SLOT if isinstance(x, torch.Tensor) else x for x in leaves)
        key = (spec, tuple(_leaf_key(x) for x in leaves), _autocast_state(tensors))
        return Call(tensors, key, spec, constants, timestep, return_dict)

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


def _first_tensor(named: dict) -> torch.Tensor | None:
    for leaf in pytree.tree_leaves(named):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _host_number(t: Any) -> int | float:
    """A timestep given as a number (Python or numpy, e.g. from `scheduler.timesteps.numpy()`)
    as a Python int or float, so numpy scalars capture and compare like Python numbers."""
    if isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_)):
        return operator.index(t)
    if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)):
        return float(t)
    raise TypeError(f"timestep must be a tensor or a real number (Python or numpy), got {type(t).__name__}")


def _timestep_tensor(t: int | float, like: torch.Tensor | None) -> torch.Tensor:
    # Same tensor diffusers makes from a Python number, so results are identical; as a
    # tensor the timestep is a graph input instead of a constant baked into the capture.
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
    try:
        with _held_logs(_EXPORT_LOGGERS) as held, torch.no_grad():
            ep = torch.export.export(adapter, call.tensors, strict=False)
    except Exception as export_error:
        # Usually the arguments do not fit the U-Net (a wrong width or channel count): then
        # the plain U-Net's own error says so, without export's fake-tensor traceback.
        try:
            with torch.no_grad():
                adapter(*call.tensors)
        except Exception as eager_error:
            raise eager_error from None
        _replay(held)
        export_error.add_note("dcfx captures the U-Net with torch.export; the plain U-Net runs this call")
        raise
    _replay(held)
    exported = ep.module()
    # A plain GraphModule over the same graph, weights and submodules, without the input
    # checks export registers as forward hooks: the signature key already pins what they check.
    gm = torch.fx.GraphModule(exported, exported.graph, class_name=type(exported).__name__)
    gm.meta.update(exported.meta)
    # Flat positional inputs and a flat output tuple: the runtime owns the pytree handling,
    # and the passes may append inputs/outputs.
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    # Export's dtype/device assertions are side effects that would keep the deep path alive
    # in the shallow graph; the signature key pins what they check too.
    for node in list(gm.graph.find_nodes(op="call_function", target=_private.export_assert_op())):
        gm.graph.erase_node(node)
    gm.recompile()
    return Capture(gm, ep.call_spec.out_spec)


# Loggers that report a failed export at error level (one traceback-long record per failure).
_EXPORT_LOGGERS = ("torch._subclasses.fake_tensor",)


@contextlib.contextmanager
def _held_logs(names: tuple[str, ...]) -> Iterator[list[logging.LogRecord]]:
    """Hold back these loggers' records; the caller replays them or drops them."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(hold)


def _replay(records: list[logging.LogRecord]) -> None:
    for record in records:
        logging.getLogger(record.name).handle(record)


def module_path(node: torch.fx.Node) -> str:
    """The U-Net module path a node was traced in ('' for the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("self.")
    return path[len(UNET_PREFIX):] if path.startswith(UNET_PREFIX) else ("" if path == "unet" else path)


def unflatten_output(out: tuple, out_spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten(list(out), out_spec)



class _Leaf:
    """A signature key's leaf, opaque to pytree (its tuples are not containers)."""

    def __init__(self, key: Any):
        self.key = key


def describe_signature(key: tuple) -> str:
    """A signature key (`Call.key`) in words: each tensor argument's dtype, shape and device,
    and the non-tensor arguments that are set, e.g.
    "sample float32[2, 4, 8, 8] cpu, timestep int64[1] cpu, encoder_hidden_states ...".
    """
    spec, leaves, autocast = key
    tree = pytree.tree_unflatten([_Leaf(x) for x in leaves], spec)
    parts = []
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        name = pytree.keystr(path).replace("['", ".").replace("']", "").lstrip(".")
        kind, *rest = leaf.key
        if kind == "T":
            shape, dtype, device = rest
            parts.append(f"{name} {str(dtype).removeprefix('torch.')}{list(shape)} {device}")
        elif rest[-1] is not None:
            parts.append(f"{name}={rest[-1]!r}")
    if autocast:
        parts.append(f"autocast {autocast}")
    return ", ".join(parts)
