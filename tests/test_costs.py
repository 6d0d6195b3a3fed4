"""`dcfx.costs` (cost in full-call equivalents, a generation's spent FLOPs) and `CacheLayout`
(the record a graph set's layout travels in), without a model: both are plain arithmetic and
data. Counting a graph's FLOPs is checked against torch's counter in test_runtime.py
(`dcfx.report`) and test_policies.py (`spent`)."""

from __future__ import annotations

import json

import pytest
import torch

from dcfx.costs import GraphCost, equivalents, full_steps_for, history_cost, spent
from dcfx.passes import BlocksCut, CacheLayout, UNetCut


def test_a_generation_costs_its_full_calls_plus_its_shallow_ones_at_their_fraction():
    assert history_cost("FFFF", 0.25) == 4  # plain sampling with T steps costs T
    assert history_cost("FSSFSS", 0.25) == equivalents(2, 4, 0.25) == 3.0
    cost = GraphCost({"full": 8, "shallow": 2})
    assert cost.shallow_fraction == 0.25 and cost.generation_flops(2, 4) == 24
    # The budget's full steps are the most whose generation stays within it.
    count = full_steps_for(10, 50, 0.1)
    assert equivalents(count, 50 - count, 0.1) <= 10 < equivalents(count + 1, 49 - count, 0.1)


def test_a_slot_keeps_the_cached_outputs_or_a_forecasts_history():
    feature, stats = torch.empty(2, 4, 8, 8, device="meta"), torch.empty(2, 2, device="meta")
    cost = GraphCost({"full": 1, "shallow": 1}, (feature, stats))
    assert cost.slot_bytes() == 4 * (2 * 4 * 8 * 8 + 2 * 2)
    assert cost.slot_bytes(forecast=2) == 3 * 4 * (2 * 4 * 8 * 8) + 4 * 4  # 3 features, 4 times


def test_spent_prices_each_graph_run_and_plain_calls_as_full_ones():
    headed = GraphCost({"head": 1, "rest": 9, "tail": 2, "full": 10, "shallow": 3})
    s = spent("FSS", [("head", 3, headed), ("rest", 1, headed), ("tail", 2, headed)], plain_calls=1, plain_cost=headed)
    assert s.runs == {"head": 3, "rest": 1, "tail": 2} and s.plain_steps == 1
    assert s.flops == 3 * 1 + 9 + 2 * 2 + 10 and s.plain_flops == 4 * 10
    assert s.cost == pytest.approx(3 * s.flops / s.plain_flops)
    assert spent("FS", [("full", 1, None), ("shallow", 1, None)]).flops is None  # AOT graphs: not counted


def test_a_layout_travels_as_json_and_names_its_graphs():
    layout = CacheLayout(UNetCut(1, 4), ("head", "rest", "tail"), num_cached=2, forecast=1, num_boundary=5,
                         cut_index=3, timestep_index=1)
    assert CacheLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    assert layout.head and (layout.full_kind, layout.shallow_kind) == ("rest", "tail") and layout.cut.label == "b1"
    plain = CacheLayout(UNetCut(0, 4))
    assert not plain.head and (plain.full_kind, plain.shallow_kind) == ("full", "shallow")
    data = plain.to_dict()
    data["cut"]["family"] = "dit"
    with pytest.raises(ValueError, match="unknown cut family 'dit'; dcfx knows unet"):
        CacheLayout.from_dict(data)


def test_a_transformer_cut_travels_in_the_layout():
    layout = CacheLayout(BlocksCut(2, 1, 6), num_cached=1, forecast=2, timestep_index=3)
    data = json.loads(json.dumps(layout.to_dict()))
    assert data["cut"] == {"family": "transformer", "first_blocks": 2, "last_blocks": 1, "num_blocks": 6}
    assert CacheLayout.from_dict(data) == layout
    assert layout.cut.label == "F2B1" and "the first 2 and the last 1 of 6 transformer blocks" in layout.cut.describe()


def test_a_plain_call_costs_what_the_full_graph_does():
    from _tiny_unet import CROSS_DIM, LATENT, TOKENS, tiny_unet

    import dcfx
    from dcfx.costs import call_flops

    unet = tiny_unet()
    args = (torch.randn(2, 4, LATENT, LATENT), torch.tensor(900), torch.randn(2, TOKENS, CROSS_DIM))
    graphs = dcfx.optimize(unet).graphs(*args)
    assert call_flops(unet, *args) == graphs.cost.full > graphs.cost.shallow > 0
