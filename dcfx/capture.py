"""Capture: a U-Net plus one call's arguments -> an FX graph over the call's tensors.

The call is normalised (positional or keyword, Python-number timestep or tensor), flattened
with torch's pytree, and exported with `torch.export`. The graph takes the call's tensor
leaves as placeholders, in flattening order, and returns the output's tensor leaves. A
timestep given as a number becomes the tensor the model class itself would make of it, and
float values in `cross_attention_kwargs` and `added_cond_kwargs` (a LoRA scale schedule)
become 0-d float64 tensors, so both are graph inputs and a new value costs no new capture;
where the U-Net branches on such a float (PEFT does on its LoRA scale), the call is bound
again with the floats as constants (`CallBinder.keep_floats`). All other non-tensor values
(flags, the argument structure) are constants of the graph and part of the signature key,
so a call that differs in any of them gets its own capture. Weights stay the module's own
tensors (`get_attr`, no copy).
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
from .passes.functional import remove_mutations

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
    sample: Any = None  # the sample argument as passed
    conditioning: tuple[torch.Tensor, ...] = ()  # tensors identifying the call's stream
    timestep_index: int | None = None  # the timestep's position in `tensors`
    lifted: bool = False  # some float arguments are graph inputs (see the module docstring)


class FloatsNotLiftable(Exception):
    """Export failed because the U-Net branches on a float that was made a graph input."""


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
        self._sample_name = names[0] if names else None
        self._module = module
        self._timestep_kind = _timestep_kind(module)
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
            timestep = _host_number(timestep)
            named[self._timestep_name] = _timestep_tensor(timestep, _first_tensor(named), self._timestep_kind)
        lifted = False
        attention = named.get("cross_attention_kwargs")
        if isinstance(attention, dict) and "scale" in attention:
            named["cross_attention_kwargs"] = attention = _lora_scale(attention, self._module, _first_tensor(named))
        if lift:
            for name in LIFTED:
                value = named.get(name)
                if isinstance(value, dict):
                    new = _lift_floats(value, _first_tensor(named))
                    if new is not value:
                        named[name], lifted = new, True
        leaves, spec = pytree.tree_flatten(named)
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        constants = tuple(TENSOR_SLOT if isinstance(x, torch.Tensor) else x for x in leaves)
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


# Keyword arguments whose float values become graph inputs (per-step scalars: a LoRA scale).
LIFTED = ("cross_attention_kwargs", "added_cond_kwargs")
# Arguments that change every step by design: not part of a call's stream (its conditioning).
PER_STEP_ARGUMENTS = frozenset(
    {"down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"}
)


def _lora_scale(attention: dict, module: nn.Module, like: torch.Tensor | None) -> dict:
    """`cross_attention_kwargs` with its LoRA scale as a graph input, or without it.

    diffusers reads the scale in Python (PEFT scales the adapter layers' `scaling` before
    the forward): without adapters it is ineffective, so it is dropped; with adapters it
    becomes a 0-d tensor that `_Adapter` multiplies into the layers' scalings while it
    exports, so the graph scales the LoRA updates by its input, and a schedule of scales
    costs one export.
    """
    attention = dict(attention)
    scale = attention.pop("scale")
    if scale is not None and _lora_layers(module):
        device = like.device if like is not None else None
        attention["scale"] = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64, device=device)
    return attention


def _lora_layers(module: nn.Module) -> list[nn.Module]:
    """PEFT's LoRA layers (a `scaling` dict per adapter) in `module`."""
    return [m for m in module.modules() if isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "lora_A")]


@contextlib.contextmanager
def _lora_scaled(module: nn.Module, scale: torch.Tensor) -> Iterator[None]:
    """Multiply every LoRA layer's scalings by `scale` (a traced tensor) for one trace."""
    saved = [(m, dict(m.scaling)) for m in _lora_layers(module)]
    try:
        for m, scaling in saved:
            for name, value in scaling.items():
                m.scaling[name] = value * scale
        yield
    finally:
        for m, scaling in saved:
            m.scaling.clear()
            m.scaling.update(scaling)


def _lift_floats(value: dict, like: torch.Tensor | None) -> dict:
    """`value` with its float entries (nested too) as 0-d float64 tensors; itself if none."""
    out, changed = {}, False
    device = like.device if like is not None else None
    for k, v in value.items():
        if isinstance(v, float) or isinstance(v, np.floating):
            out[k], changed = torch.tensor(float(v), dtype=torch.float64, device=device), True
        elif isinstance(v, dict):
            new = _lift_floats(v, like)
            out[k], changed = new, changed or new is not v
        else:
            out[k] = v
    return out if changed else value


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


# How each diffusers model class turns a timestep given as a number into a tensor:
# (dtype for a float, dtype for an int); "device" adjusts for devices without 64-bit types.
_TIMESTEP_KINDS = {
    "UNet1DModel": (torch.int64, torch.int64),
    "UNet2DModel": (torch.int64, torch.int64),  # a float is truncated: long, as diffusers does
    "Kandinsky3UNet": (torch.float32, torch.int32),
}
_DEFAULT_TIMESTEP_KIND = (torch.float64, torch.int64)
_NO_64_BIT = ("mps", "npu", "neuron")  # devices diffusers gives 32-bit timesteps


def _timestep_kind(module: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    for cls in type(module).__mro__:
        if cls.__name__ in _TIMESTEP_KINDS:
            return _TIMESTEP_KINDS[cls.__name__]
    return _DEFAULT_TIMESTEP_KIND


def _timestep_tensor(t: int | float, like: torch.Tensor | None,
                     kind: tuple[torch.dtype, torch.dtype] = _DEFAULT_TIMESTEP_KIND) -> torch.Tensor:
    # The tensor the model class makes from a Python number, so results are identical; as a
    # tensor the timestep is a graph input instead of a constant baked into the capture.
    device = like.device if like is not None else None
    dtype = kind[0] if isinstance(t, float) else kind[1]
    if kind == _DEFAULT_TIMESTEP_KIND and device is not None and device.type in _NO_64_BIT:
        dtype = torch.float32 if dtype == torch.float64 else torch.int32
    if dtype in (torch.int64, torch.int32) and isinstance(t, float):
        t = int(t)  # torch.tensor([500.7], dtype=long) truncates, as the model class's own does
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
        attention = named.get("cross_attention_kwargs")
        if isinstance(attention, dict) and isinstance(attention.get("scale"), torch.Tensor):
            named["cross_attention_kwargs"] = attention = dict(attention)
            with _lora_scaled(self.unet, attention.pop("scale")):  # see `_lora_scale`
                return self.unet(**named)
        return self.unet(**named)


def capture(unet: nn.Module, call: Call) -> Capture:
    """Export `unet` for this call. The graph shares the module's parameters and buffers."""
    adapter = _Adapter(unet, call)
    try:
        with _held_logs(_EXPORT_LOGGERS) as held, torch.no_grad():
            ep = torch.export.export(adapter, call.tensors, strict=False)
    except Exception as export_error:
        if call.lifted:
            # Perhaps the U-Net branches on a float made a graph input: the caller binds the
            # call again with its floats as constants (and says why if that fails too).
            raise FloatsNotLiftable(str(export_error)) from export_error
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
    remove_mutations(gm)  # export keeps in-place writes (FreeU's): the passes need none
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
