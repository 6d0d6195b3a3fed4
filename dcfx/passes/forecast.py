"""Forecast pass: the shallow graph extrapolates the cached deep feature instead of reusing it.

In: a shallow (or tail) graph from `split`, whose placeholder `deepcache_feature` is the deep
feature of the last full step, and the index of its timestep placeholder.

Out: the same graph with more trailing inputs, right after `deepcache_feature` (c0, the last
full step's feature): `deepcache_feature_1` (c1, the full step before), for order 2
`deepcache_feature_2` (c2), and `deepcache_times`, a float32 vector [n, t0, t1, (t2)]: how many
of those features are valid in this generation, and their timesteps. Every reader of c0 reads
instead the polynomial through (t_i, c_i) of degree min(order, n - 1), evaluated at this step's
timestep (Lagrange form, weights computed in the graph), as TaylorSeer forecasts features from
finite differences. So the forecast costs no recompile per step, no host read, and is CUDA-graph
safe: the runtime only shifts buffers on full steps. Order k keeps k more cached tensors.
The pass runs after `fuse_cut` (the fused op then reads the forecast) and never with
`cache_cut_stats` (the statistics of a forecast change every step).
"""

from __future__ import annotations

import torch
from torch import fx

from .split import CACHE_INPUT, finish_graph

FORECAST_META = "dcfx_forecast"  # graph meta: the forecast order (0: the feature is reused)
TIMES_INPUT = "deepcache_times"
ORDERS = (0, 1, 2)


def _weights1(times: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, t0, t1 = times[0], times[1], times[2]
    a = (t - t0) / (t0 - t1)
    line = n >= 2
    return torch.where(line, 1 + a, torch.ones_like(a)), torch.where(line, -a, torch.zeros_like(a))


def _forecast1(c0: torch.Tensor, c1: torch.Tensor, times: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    t = timestep.reshape(-1)[0].to(torch.float32)
    w0, w1 = _weights1(times, t)
    return c0 * w0.to(c0.dtype) + c1 * w1.to(c0.dtype)


def _forecast2(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, times: torch.Tensor,
               timestep: torch.Tensor) -> torch.Tensor:
    t = timestep.reshape(-1)[0].to(torch.float32)
    n, t0, t1, t2 = times[0], times[1], times[2], times[3]
    # Where fewer points are valid the unused branch may divide by zero; `where` discards it.
    q0 = (t - t1) * (t - t2) / ((t0 - t1) * (t0 - t2))
    q1 = (t - t0) * (t - t2) / ((t1 - t0) * (t1 - t2))
    q2 = (t - t0) * (t - t1) / ((t2 - t0) * (t2 - t1))
    l0, l1 = _weights1(times, t)
    parabola = n >= 3
    w0 = torch.where(parabola, q0, l0)
    w1 = torch.where(parabola, q1, l1)
    w2 = torch.where(parabola, q2, torch.zeros_like(q2))
    dtype = c0.dtype
    return c0 * w0.to(dtype) + c1 * w1.to(dtype) + c2 * w2.to(dtype)


def forecast(gm: fx.GraphModule, order: int, timestep_index: int) -> fx.GraphModule:
    """A copy of shallow graph `gm` that reads the order-`order` forecast of its cached feature
    (module docstring). Order 0 returns `gm` unchanged."""
    if order not in ORDERS:
        raise ValueError(f"forecast order must be one of {ORDERS}, got {order!r}")
    if order == 0:
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cache = next(p for p in placeholders if p.name == CACHE_INPUT)
    timestep = placeholders[timestep_index]
    val = cache.meta.get("val")
    inputs = [cache]
    anchor = cache.next
    for k in range(1, order + 1):
        with graph.inserting_before(anchor):
            p = graph.placeholder(f"{CACHE_INPUT}_{k}")
        p.meta = dict(cache.meta)
        inputs.append(p)
    with graph.inserting_before(anchor):
        times = graph.placeholder(TIMES_INPUT)
    if isinstance(val, torch.Tensor):
        times.meta["val"] = val.new_empty((order + 2,), dtype=torch.float32)
    readers = list(cache.users)
    body = fx.symbolic_trace(_forecast1 if order == 1 else _forecast2).graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_before(last_input.next):
        forecast_node = graph.graph_copy(body, dict(zip(_placeholders(body), [*inputs, times, timestep])))
    forecast_node.meta = {k: v for k, v in cache.meta.items() if k in ("val", "tensor_meta")}
    for reader in readers:
        reader.replace_input_with(cache, forecast_node)
    out = finish_graph(gm, graph)
    out.meta.update(gm.meta)
    out.meta[FORECAST_META] = order
    return out


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]
