"""Profiler ranges per step, `DeepCacheUNet.graphs()` and its `cut`, on tiny U-Nets (no
torch.compile). The `dcfx profile` and `dcfx graphs` commands: test_cli.py."""

from __future__ import annotations

import ast

import pytest
import torch
import torch.utils._pytree as pytree
from _tiny_unet import NUM_SKIPS, skip_consumer
from torch.profiler import profile, record_function

import dcfx
from dcfx.inspection import WRITTEN_BY

FUSED_OP = "dcfx::cat_group_norm_silu"


@pytest.fixture(scope="module")
def call(inputs):
    x, ehs = inputs
    return (x, torch.tensor([999])), {"encoder_hidden_states": ehs}


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


@pytest.mark.slow
def test_ranges_name_every_step(unet, call):
    args, kwargs = call
    fast = dcfx.optimize(unet, interval=3, branch=0)
    with torch.no_grad():
        fast(*args, **kwargs)  # capture outside the profile
        fast.begin(6)
        with profile() as prof:
            for i in range(6):
                with record_function(f"call {i}"):
                    fast(*args, **kwargs)
    assert fast.history[-1] == "FSSFSS"
    events = prof.events()
    by_name = lambda name: [e for e in events if e.name == name]  # noqa: E731
    full, shallow, copies = by_name("dcfx.full[b0]"), by_name("dcfx.shallow[b0]"), by_name("dcfx.cache_copy")
    assert (len(full), len(shallow), len(copies)) == (2, 4, 2)
    # Each step's range sits in its own call, in schedule order; the copy inside the full range.
    assert [next(_ancestors(e)) for e in full] == ["call 0", "call 3"]
    assert [next(_ancestors(e)) for e in shallow] == ["call 1", "call 2", "call 4", "call 5"]
    assert all(next(_ancestors(e)) == "dcfx.full[b0]" for e in copies)
    fused = by_name(FUSED_OP)
    assert len(fused) == 4 and all("dcfx.shallow[b0]" in _ancestors(e) for e in fused)

    # Another branch says so in its range names.
    other = dcfx.optimize(unet, interval=2, branch=2)
    with torch.no_grad(), profile() as prof:
        other.begin(2)
        other(*args, **kwargs)
        other(*args, **kwargs)
    names = [e.name for e in prof.events() if e.name.startswith("dcfx.")]
    assert names.count("dcfx.full[b2]") == 1 and names.count("dcfx.shallow[b2]") == 1


def test_graphs_are_what_the_runtime_runs(unet, call):
    args, kwargs = call
    fast = dcfx.optimize(unet, interval=2, branch=1)
    graphs = fast.graphs(*args, **kwargs)
    assert fast.history == ()  # no step ran
    assert graphs.branch == 1 and graphs.inputs[0] is args[0]
    weight = graphs.full.get_parameter("unet.conv_in.weight")
    assert weight.data_ptr() == unet.conv_in.weight.data_ptr()  # the U-Net's own weights
    with torch.no_grad():
        out = graphs.full(*graphs.inputs)
        leaves, cached = out[: -graphs.num_cached], out[-graphs.num_cached :]
        by_hand_full = pytree.tree_unflatten(list(leaves), graphs.out_spec).sample
        by_hand_shallow = pytree.tree_unflatten(list(graphs.shallow(*graphs.inputs, *cached)), graphs.out_spec).sample
        fast.begin(2)
        ran_full = fast(*args, **kwargs).sample
        ran_shallow = fast(*args, **kwargs).sample  # an exact repeat starts the next step
    assert fast.history[-1] == "FS"
    assert torch.equal(ran_full, by_hand_full)
    assert torch.equal(ran_shallow, by_hand_shallow)
    assert not torch.equal(ran_full, ran_shallow)  # the shallow step really is another graph


@pytest.mark.parametrize("branch,fuse", [(0, True), (0, False), (NUM_SKIPS - 1, True)])
def test_cut_names_the_unets_modules(unet, call, branch, fuse):
    args, kwargs = call
    graphs = dcfx.optimize(unet, branch=branch, fuse_cut=fuse).graphs(*args, **kwargs)
    cut = graphs.cut
    assert (cut.branch, cut.num_skips) == (branch, NUM_SKIPS)
    assert unet.get_submodule(cut.consumer) is skip_consumer(unet, branch)
    with torch.no_grad():
        cached = graphs.full(*graphs.inputs)[-graphs.num_cached :]
    assert len(cut.cached) == len(cached) == (2 if fuse else 1)
    assert cut.cached[0].name == "deepcache_feature"
    for described, tensor in zip(cut.cached, cached):
        assert described.shape == tuple(tensor.shape) and described.dtype == tensor.dtype
        assert described.nbytes == tensor.numel() * tensor.element_size()
    assert cut.cached_bytes == sum(t.numel() * t.element_size() for t in cached)
    unet.get_submodule(cut.cached[0].producer)

    # Every listed module exists; together they cover each module whose weights the full
    # graph reads exactly once; a shallow step reads all weights of the ones it runs and
    # none of the skipped ones'.
    def read(gm):
        return {n.target.removeprefix("unet.") for n in gm.graph.nodes if n.op == "get_attr"}

    full_params, shallow_params = read(graphs.full), read(graphs.shallow)
    listed = cut.shallow_modules + cut.skipped_modules
    assert len(set(listed)) == len(listed)
    for path in listed:
        unet.get_submodule(path)
    for param in full_params:
        assert sum(param.startswith(path + ".") for path in listed) == 1, param
    for path in cut.shallow_modules:
        assert {p for p in full_params if p.startswith(path + ".")} <= shallow_params, path
    for path in cut.skipped_modules:
        assert not any(p.startswith(path + ".") for p in shallow_params), path
    assert "mid_block" in cut.skipped_modules
    assert {"conv_in", "conv_out"} <= set(cut.shallow_modules)
    assert 0 < cut.shallow_nodes < cut.full_nodes
    text = str(cut)
    assert cut.consumer in text and f"{cut.cached_bytes:,} bytes" in text and "mid_block" in text


def test_write_readable_graphs(unet, call, tmp_path):
    args, kwargs = call
    graphs = dcfx.optimize(unet).graphs(*args, **kwargs)
    paths = graphs.write(tmp_path / "graphs")
    assert [p.name for p in paths] == ["full.py", "shallow.py", "cut.txt"]
    for p in paths[:2]:
        code = p.read_text()
        ast.parse(code)
        assert code.startswith(WRITTEN_BY) and "# -- module: conv_in" in code
    assert "torch.ops.dcfx.cat_group_norm_silu" in paths[1].read_text()
    assert str(graphs.cut) in paths[2].read_text()
