"""Export: a U-Net and one bound call -> an FX graph over the call's tensors.

The graph takes the call's tensor leaves as placeholders, in flattening order, and returns
the output's tensor leaves (flat: the runtime owns the pytree handling, and the passes may
append inputs and outputs). Weights stay the module's own tensors (`get_attr`, no copy).
Export's dtype/device assertions are removed; in-place writes are left for the passes
(`passes.functional`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .. import _torch_private as _private
from .._torch_private import pytree
from .binding import TENSOR_LEAF, Call
from .lora import lora_scaled

UNET_PREFIX = "unet."  # the adapter holds the U-Net as `unet`: module paths start so


class FloatsNotLiftable(Exception):
    """Export failed because the U-Net branches on a float that was made a graph input."""


@dataclass
class Capture:
    """An exported call: `graph_module(*tensors)` returns the output's tensor leaves."""

    graph_module: torch.fx.GraphModule
    out_spec: pytree.TreeSpec


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
        leaves = [next(it) if c is TENSOR_LEAF else c for c in self._constants]
        named = pytree.tree_unflatten(leaves, self._spec)
        if self._has_return_dict:
            # The output object (e.g. UNet2DConditionOutput) is a pytree node, so its class
            # lands in the out spec; the runtime turns it into a tuple for return_dict=False.
            named["return_dict"] = True
        attention = named.get("cross_attention_kwargs")
        if isinstance(attention, dict) and isinstance(attention.get("scale"), torch.Tensor):
            named["cross_attention_kwargs"] = attention = dict(attention)
            with lora_scaled(self.unet, attention.pop("scale")):  # see `lora_scale`
                return self.unet(**named)
        return self.unet(**named)


def capture(unet: nn.Module, call: Call) -> Capture:
    """Export `unet` for this call. The graph shares the module's parameters and buffers."""
    adapter = _Adapter(unet, call)
    try:
        with _held_logs(_private.EXPORT_ERROR_LOGGERS) as held, torch.no_grad():
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
    return Capture(gm, ep.call_spec.out_spec)


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
