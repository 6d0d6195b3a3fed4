"""The split and fuse passes as graph transformations: structure, equality, SD1.5 on meta."""

import pytest
import torch
from _tiny_unet import ReferenceDeepCache
from _tolerance import assert_float32_close, assert_float32_far, float64_copy
from diffusers import UNet2DConditionModel, UNet2DModel

import dcfx
from dcfx.capture import CallBinder, capture, module_path
from dcfx.passes.fuse import FUSED_OP, fuse_cut
from dcfx.passes.split import CACHE_INPUT, find_skips, split

aten = torch.ops.aten


def _tiny_unet(layers_per_block=2):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


# The fused cut against the unfused graph: float32 against the unfused graph's float64 run
# (tests/_tolerance.py). A wrong cache input moves the output by more than FAR such bounds.
FAR = 100


@pytest.fixture(scope="module")
def captured():
    unet = _tiny_unet()
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    call = CallBinder(unet).bind((x, torch.tensor(500)), {"encoder_hidden_states": ehs})
    return unet, call, capture(unet, call)


@pytest.fixture(scope="module")
def output64(captured):
    """The float64 reference of every shallow graph below, fed its own inputs' feature: such a
    graph computes what the full graph computes, bit for bit (checked below), and that is the
    U-Net's output, here from a float64 copy."""
    unet, call, _ = captured
    x, t, ehs = call.tensors
    with torch.no_grad():
        return float64_copy(unet)(x.double(), t, encoder_hidden_states=ehs.double()).sample


def test_capture_shares_weights_and_matches_module(captured):
    unet, call, cap = captured
    params = {id(p) for p in unet.parameters()}
    used = list(cap.graph_module.parameters())
    assert len(used) == len(params) and all(id(p) in params for p in used)
    with torch.no_grad():
        out = cap.graph_module(*call.tensors)[0]
        ref = unet(*call.tensors[:2], encoder_hidden_states=call.tensors[2]).sample
    assert torch.equal(out, ref)


def test_skips_in_production_order(captured):
    _, _, cap = captured
    skips = find_skips(cap.graph_module.graph)
    # conv_in, 2 resnets + downsampler of block 0, 2 attentions of block 1 (no downsampler).
    where = [module_path(s.skip) for s in skips]
    assert len(skips) == 6
    assert where[0] == "conv_in"
    assert where[1].startswith("down_blocks.0.resnets.0") and where[3].startswith("down_blocks.0.downsamplers.0")
    assert where[4].startswith("down_blocks.1.attentions.0") and where[5].startswith("down_blocks.1.attentions.1")
    # s0 is concatenated last in the up path, s5 first.
    assert module_path(skips[0].concat) == "up_blocks.1"
    assert module_path(skips[5].concat) == "up_blocks.0"


@pytest.mark.parametrize("branch", range(6))
def test_shallow_graph_equals_full_graph_given_the_cache(captured, output64, branch):
    _, call, cap = captured
    graphs = split(cap.graph_module, branch)
    with torch.no_grad():
        *full_out, feature = graphs.full(*call.tensors)
        shallow_out = graphs.shallow(*call.tensors, feature)
        fused_out = fuse_cut(graphs.shallow)(*call.tensors, feature)
        # A different cache must change the result: the shallow graph really reads it.
        other = graphs.shallow(*call.tensors, torch.randn_like(feature))
    assert torch.equal(full_out[0], cap.graph_module(*call.tensors)[0])
    # The shallow graph is the full graph's outer part, the same ops on the same inputs.
    assert torch.equal(shallow_out[0], full_out[0])
    assert_float32_close(fused_out[0], shallow_out[0], output64, what=f"fused cut, branch {branch}")
    assert_float32_far(other[0], shallow_out[0], output64, times=FAR, what="another cache")
    assert "mid_block" not in {module_path(n).split(".")[0] for n in graphs.shallow.graph.nodes}
    # Deeper branches keep more of the network.
    assert len(graphs.shallow.graph.nodes) < len(graphs.full.graph.nodes)


def test_fused_graph_has_the_op_and_no_concat_at_the_cut(captured):
    _, _, cap = captured
    for branch in range(6):
        shallow = split(cap.graph_module, branch).shallow
        fused = fuse_cut(shallow)
        (cache,) = [n for n in fused.graph.nodes if n.name == CACHE_INPUT]
        assert fused.meta["dcfx_fused"] == 1
        assert not any(u.target is aten.cat.default for u in cache.users)
        ops = [u for u in cache.users if u.target is FUSED_OP]
        assert len(ops) == 1
        # The shortcut conv reads the cache directly (split by linearity).
        assert any(u.target is aten.conv2d.default for u in cache.users)
        n_cats = lambda g: sum(n.target is aten.cat.default for n in g.graph.nodes)  # noqa: E731
        assert n_cats(fused) == n_cats(shallow) - 1
        # The original graph is untouched.
        (orig_cache,) = [n for n in shallow.graph.nodes if n.name == CACHE_INPUT]
        assert any(u.target is aten.cat.default for u in orig_cache.users)


def test_fuse_leaves_unmatched_patterns_alone():
    # A concat of the cache read by something other than GroupNorm->SiLU / a conv stays.
    g = torch.fx.Graph()
    cache = g.placeholder(CACHE_INPUT)
    skip = g.placeholder("skip")
    for node, shape in ((cache, (1, 4, 2, 2)), (skip, (1, 4, 2, 2))):
        node.meta["val"] = torch.empty(shape, device="meta")
    cat = g.call_function(aten.cat.default, ([cache, skip], 1))
    g.output((g.call_function(aten.relu.default, (cat,)),))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    fused = fuse_cut(gm)
    assert fused.meta["dcfx_fused"] == 0
    x, y = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(fused(x, y)[0], gm(x, y)[0])


def test_fusion_can_be_turned_off(monkeypatch):
    unet = _tiny_unet(layers_per_block=1)
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)

    def run(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        fast = dcfx.optimize(unet, interval=2)
        with torch.no_grad():
            outs = [fast(x, t, ehs).sample for t in (900, 800)]
        (entry,) = fast.runtime.entries.current.values()
        return outs, entry.shallow.graph

    fused_outs, fused_graph = run()
    plain_outs, plain_graph = run(DCFX_DISABLE_FUSION="1")
    # The unfused shallow step's float64 run: DeepCache by hand on a float64 copy.
    oracle = ReferenceDeepCache(unet, 0)
    with torch.no_grad():
        oracle("F", x, 900, ehs)
        _, plain64 = oracle("S", x, 800, ehs)
    assert any(n.target is FUSED_OP for n in fused_graph.graph.nodes)
    assert not any(n.target is FUSED_OP for n in plain_graph.graph.nodes)
    assert_float32_close(fused_outs[1], plain_outs[1], plain64, what="fused against unfused")
    config_off = dcfx.optimize(unet, interval=2, fuse_cut=False)
    monkeypatch.delenv("DCFX_DISABLE_FUSION")
    with torch.no_grad():
        config_off(x, 900, ehs), config_off(x, 800, ehs)
    (entry,) = config_off.runtime.entries.current.values()
    assert not any(n.target is FUSED_OP for n in entry.shallow.graph.graph.nodes)


def test_unet2dmodel_splits_without_special_cases():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    call = CallBinder(unet).bind((torch.randn(1, 3, 8, 8), 10), {})
    cap = capture(unet, call)
    n = len(find_skips(cap.graph_module.graph))
    assert n == 6
    with pytest.raises(ValueError, match=r"valid branches are 0\.\.5"):
        split(cap.graph_module, 6)


def test_no_host_sync_ops_in_graphs(captured):
    _, _, cap = captured
    graphs = split(cap.graph_module, 2)
    for gm in (graphs.full, graphs.shallow, fuse_cut(graphs.shallow)):
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert aten._local_scalar_dense.default not in targets
        assert aten.item.default not in targets


@pytest.mark.slow
def test_sd15_structure_on_meta():
    # The SD1.5 configuration (diffusers' defaults + 768-d cross attention), no weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        args = (torch.randn(2, 4, 64, 64), torch.tensor(999), torch.randn(2, 77, 768))
    call = CallBinder(unet).bind(args, {})
    cap = capture(unet, call)
    assert len(find_skips(cap.graph_module.graph)) == 12
    shallow = split(cap.graph_module, 0).shallow
    paths = {module_path(n) for n in shallow.graph.nodes if n.op in ("call_function", "get_attr")}
    assert not any(p.startswith(("mid_block", "down_blocks")) for p in paths)
    assert any(p.startswith("conv_in") for p in paths) and any(p.startswith("up_blocks.3") for p in paths)
    rep = dcfx.report(unet, *args, branches=[0, 11], num_steps=50, config=dcfx.DeepCacheConfig(interval=5))
    row0, row11 = rep.branches
    assert rep.num_skips == 12
    # 2 images x 401.6 GMACs x 2 FLOPs/MAC.
    assert row0.full_flops == pytest.approx(2 * 2 * 401.6e9, rel=1e-3)  # 401.6 to four digits
    assert row0.shallow_fraction < 0.10
    assert row11.shallow_fraction > 0.9
    assert row0.num_full_steps == 10
    expected = 50 / (10 + 40 * row0.shallow_fraction)
    assert row0.speedup_bound == pytest.approx(expected)
    text = str(rep)
    assert "branch" in text and "speedup bound" in text and "0..11" in text


@pytest.mark.parametrize("branch", [0, 3, 5])
def test_cached_feature_statistics_move_to_the_full_graph(captured, output64, branch):
    from dcfx.passes import deepcache_graphs
    from dcfx.passes.fuse import STATS_INPUT, STATS_OP
    from dcfx.passes.split import CACHED_OUTPUTS

    _, call, cap = captured
    full, shallow = deepcache_graphs(cap.graph_module, branch, True)
    # The full graph returns the feature and its statistics; the shallow graph takes both.
    assert full.meta[CACHED_OUTPUTS] == 2 and shallow.meta["dcfx_fused"] == 1
    assert sum(n.target is STATS_OP for n in full.graph.nodes) == 1
    placeholders = [n.name for n in shallow.graph.nodes if n.op == "placeholder"]
    assert placeholders[-2:] == [CACHE_INPUT, STATS_INPUT]
    (op,) = [n for n in shallow.graph.nodes if n.target is FUSED_OP]
    assert op.args[6].name == STATS_INPUT
    # The full graph computes the statistics; the shallow graph only reads them.
    assert not any(n.target is STATS_OP for n in shallow.graph.nodes)
    plain = split(cap.graph_module, branch)
    with torch.no_grad():
        *out, feature, stats = full(*call.tensors)
        fused = shallow(*call.tensors, feature, stats)
        unfused = plain.shallow(*call.tensors, feature)
        stale = shallow(*call.tensors, feature, stats * 1.5)
    assert torch.equal(out[0], plain.full(*call.tensors)[0])
    assert_float32_close(fused[0], unfused[0], output64, what=f"fused cut, branch {branch}")
    assert_float32_far(stale[0], unfused[0], output64, times=FAR, what="stale statistics")  # they are read
