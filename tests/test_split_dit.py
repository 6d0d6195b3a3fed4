"""The transformer split rule (first Fn and last Bn blocks run, the middle cached as a residual)
on tiny random Flux transformers: the graphs against the plain model and against DBCache done by
hand with hooks, their structure and FLOPs, the head/rest/tail cut, fuse and forecast on its
graphs, and bad cuts; then the rule on every tiny transformer of `_tiny_transformers`."""

from collections import Counter

import pytest
import torch
from _tiny_transformers import FLUX, FLUX_GUIDANCE, TINY
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcfx.capture import CallBinder, capture, module_path
from dcfx.costs import count_flops
from dcfx.passes.forecast import forecast
from dcfx.passes.fuse import cache_cut_stats, fuse_cut
from dcfx.passes.split import CACHE_INPUT, CACHED_OUTPUTS
from dcfx.passes.split_dit import find_blocks, split_dit, split_dit_head

# (Fn, Bn) on 2 double-stream + 4 single-stream blocks: the middle in the double-stream list,
# spanning both lists, in the single-stream list; Bn = 0 (the text stream's last value is dead),
# and the largest Fn and Bn.
CUTS = [(1, 0), (1, 1), (2, 2), (1, 4), (3, 1), (5, 0)]
STEPS, INTERVAL = 6, 3
# Exactness: the captured graph runs the plain model's ATen ops in its order, and the residual
# path adds and subtracts the same tensors as the hooks do, so every comparison is bit for bit.


def _captured(tiny):
    model, kwargs = tiny.model(), tiny.inputs()
    call = CallBinder(model).bind((), kwargs)
    return model, kwargs, capture(model, call).graph_module


@pytest.fixture(scope="module")
def flux():
    return _captured(FLUX)


@pytest.fixture(scope="module")
def flux_guidance():
    return _captured(FLUX_GUIDANCE)


def _tensors(model, kwargs):
    return CallBinder(model).bind((), kwargs).tensors


def _blocks(model):
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _block_of(node):
    parts = module_path(node).split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else ""


def test_blocks_in_execution_order(flux):
    _, _, gm = flux
    paths = [b.path for b in find_blocks(gm.graph)]
    assert paths == [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(4)]


@pytest.mark.parametrize(("fn", "bn"), CUTS)
def test_full_graph_is_the_model_plus_the_residual(flux, fn, bn):
    model, kwargs, gm = flux
    code = gm.code
    graphs = split_dit(gm, fn, bn)
    tensors = _tensors(model, kwargs)
    with torch.no_grad():
        *out, residual = graphs.full(*tensors)
        expected = model(**kwargs).sample
    assert torch.equal(out[0], expected)
    assert gm.code == code  # the input graph is not modified
    weights = {id(p) for p in model.parameters()}
    assert {id(p) for g in (graphs.full, graphs.shallow) for p in g.parameters()} <= weights  # nothing copied
    assert graphs.full.meta[CACHED_OUTPUTS] == 1
    inputs = [n.name for n in graphs.shallow.graph.nodes if n.op == "placeholder"]
    assert inputs == [n.name for n in gm.graph.nodes if n.op == "placeholder"] + [CACHE_INPUT]
    # With Bn = 0 the last text tokens are dead: only the image stream is cached.
    tokens = FLUX.inputs()["hidden_states"].shape[1] + (FLUX.inputs()["encoder_hidden_states"].shape[1] if bn else 0)
    assert residual.shape == (1, tokens, 32)
    assert [s.image for s in graphs.streams] == [True] + [False] * (len(graphs.streams) - 1)


class DBCacheHooks:
    """DBCache by hand on the plain Flux model: a pre-hook on block Fn keeps the streams entering
    the middle; on a full step a hook on the middle's last block keeps what the middle added to
    each stream, on a shallow step it returns entering + kept instead of that block's output (the
    middle still runs, its result is dropped). Hooks on blocks 0 and Fn keep the image stream, for
    the head's signal."""

    def __init__(self, model, fn, bn):
        blocks = _blocks(model)
        self.full, self.entering, self.residual, self.image = True, None, None, {}
        self.handles = [
            blocks[fn].register_forward_pre_hook(self._enter, with_kwargs=True),
            blocks[len(blocks) - bn - 1].register_forward_hook(self._leave),
            blocks[0].register_forward_pre_hook(lambda m, a, kw: self.image.__setitem__(0, kw["hidden_states"]), with_kwargs=True),
        ]

    def _enter(self, module, args, kwargs):
        self.entering = (kwargs["encoder_hidden_states"], kwargs["hidden_states"])
        self.image[1] = kwargs["hidden_states"]

    def _leave(self, module, args, output):
        if self.full:
            self.residual = tuple(o - i for o, i in zip(output, self.entering))
            return None
        return tuple(i + r for i, r in zip(self.entering, self.residual))

    @property
    def signal(self):
        return self.image[1] - self.image[0]

    def remove(self):
        for h in self.handles:
            h.remove()


def _trajectory(kwargs, step):
    """Outputs of `step(i, kwargs_i)` along a toy sampler: timestep falling, the sample moved by
    each output, so a stale or wrong cache changes later steps too."""
    x, outs = kwargs["hidden_states"], []
    for i in range(STEPS):
        t = torch.full_like(kwargs["timestep"], 1.0 - i / STEPS)
        out = step(i, {**kwargs, "hidden_states": x, "timestep": t})
        outs.append(out)
        x = x - out / STEPS
    return outs


@pytest.mark.parametrize("tiny", ["flux", "flux_guidance"])
@pytest.mark.parametrize(("fn", "bn"), [(1, 0), (1, 1), (2, 2), (4, 1)])
def test_caching_loop_matches_hand_written_hooks(request, tiny, fn, bn):
    model, kwargs, gm = request.getfixturevalue(tiny)
    graphs = split_dit(gm, fn, bn)
    hooks = DBCacheHooks(model, fn, bn)
    residuals = []

    def by_hand(i, kw):
        hooks.full = i % INTERVAL == 0
        out = model(**kw).sample
        if hooks.full:
            e, h = hooks.residual
            residuals.append(torch.cat([h, e], 1) if bn else h)  # the image stream first
        return out

    def by_graphs(i, kw):
        tensors = _tensors(model, kw)
        if i % INTERVAL == 0:
            *out, by_graphs.residual = graphs.full(*tensors)
            assert torch.equal(by_graphs.residual, residuals[i // INTERVAL])
        else:
            out = graphs.shallow(*tensors, by_graphs.residual)
        return out[0]

    with torch.no_grad():
        try:
            expected = _trajectory(kwargs, by_hand)
        finally:
            hooks.remove()
        got = _trajectory(kwargs, by_graphs)
        plain = _trajectory(kwargs, lambda i, kw: model(**kw).sample)
    for i, (g, e, p) in enumerate(zip(got, expected, plain)):
        assert torch.equal(g, e), f"step {i}"
        if i % INTERVAL:  # caching changed this step's output (the comparison means something)
            assert (e - p).norm() > 1e-3 * p.norm(), f"step {i}"


class _FlopsPerBlock(fx.Interpreter):
    """Runs a graph and counts each node's FLOPs under the block it runs in ('' outside blocks).
    Attention runs as matrix products (the CPU's fused kernel has no FLOP formula; `count_flops`,
    on meta tensors, counts the fused op by the same formula)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.flops = Counter()

    def run_node(self, n):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[_block_of(n)] += counter.get_total_flops()
        return out


@pytest.fixture(scope="module")
def block_flops(flux):
    model, kwargs, gm = flux
    counter = _FlopsPerBlock(gm)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counter.run(*_tensors(model, kwargs))
    return counter.flops


@pytest.mark.parametrize(("fn", "bn"), CUTS)
def test_shallow_graph_drops_the_middle(flux, block_flops, fn, bn):
    model, kwargs, gm = flux
    graphs = split_dit(gm, fn, bn)
    middle = {b.path for b in graphs.middle}
    assert len(middle) == 6 - fn - bn
    assert not middle & {_block_of(n) for n in graphs.shallow.graph.nodes}
    kept = {b.path for b in graphs.blocks} - middle
    assert kept <= {_block_of(n) for n in graphs.shallow.graph.nodes}
    tensors = _tensors(model, kwargs)
    full, (*_, residual) = count_flops(graphs.full, tensors)
    shallow, _ = count_flops(graphs.shallow, (*tensors, residual))
    # The middle blocks' FLOPs are gone, and nothing else; but with Bn = 0 the text stream's
    # last layers in a double-stream block before the middle feed only the middle, so they go too.
    assert full == sum(block_flops.values())
    without_middle = full - sum(block_flops[p] for p in middle)
    if bn == 0 and fn <= 2:
        assert shallow < without_middle
    else:
        assert shallow == without_middle
    # A double-stream block does per token what a single-stream one does (12 d^2 multiply-adds in
    # linear layers, the same joint attention), and only its modulation (6 d^2 per stream against
    # 3 d^2, per sample) costs more; at these token counts that and the embedders outside the
    # blocks stay under 2% of the full step.
    assert shallow <= ((fn + bn) / 6 + 0.02) * full


@pytest.mark.parametrize(("fn", "bn"), CUTS)
def test_head_rest_and_tail_compose_to_full_and_shallow(flux, fn, bn):
    model, kwargs, gm = flux
    graphs, parts = split_dit(gm, fn, bn), split_dit_head(gm, fn, bn)
    tensors = _tensors(model, kwargs)
    hooks = DBCacheHooks(model, fn, bn)
    with torch.no_grad():
        try:
            model(**kwargs)
        finally:
            hooks.remove()
        *full_out, residual = graphs.full(*tensors)
        other = torch.randn_like(residual)
        boundary = parts.head(*tensors)
        *rest_out, rest_residual = parts.rest(*tensors, *boundary)
        tail_out = parts.tail(*tensors, *boundary, other)
        shallow_out = graphs.shallow(*tensors, other)
    assert len(boundary) == parts.num_boundary
    assert torch.equal(rest_out[0], full_out[0]) and torch.equal(rest_residual, residual)
    assert torch.equal(tail_out[0], shallow_out[0])
    # The signal: what blocks 0..Fn-1 added to the image stream.
    assert parts.skip_index == parts.num_boundary - 1
    assert torch.equal(boundary[parts.skip_index], hooks.signal)
    assert parts.rest.meta[CACHED_OUTPUTS] == 1

    def linears(g):
        return sum(n.target is torch.ops.aten.linear.default for n in g.graph.nodes)

    # No layer runs twice: the head's layers are not run again by the rest or the tail.
    assert linears(parts.head) + linears(parts.rest) == linears(graphs.full)
    assert linears(parts.head) + linears(parts.tail) == linears(graphs.shallow)


@pytest.mark.parametrize("order", [1, 2])
def test_fuse_and_forecast_apply_unchanged(flux, order):
    model, kwargs, gm = flux
    graphs = split_dit(gm, 1, 1)
    fused = fuse_cut(graphs.shallow)
    assert fused.meta["dcfx_fused"] == 0  # no concatenation of the cache to fuse
    assert cache_cut_stats(graphs.full, fused) == (graphs.full, fused)
    call = CallBinder(model).bind((), kwargs)
    extrapolating = forecast(fused, order, call.timestep_index)
    with torch.no_grad():
        *_, residual = graphs.full(*call.tensors)
        history = [torch.randn_like(residual) for _ in range(order)]
        # One valid feature (n = 1): the forecast is the last residual itself (weights 1 and 0).
        times = torch.tensor([1.0, 1.0, 0.9, 0.8][: order + 2])  # [n, t0, t1, t2]; this step is at 0.75
        got = extrapolating(*call.tensors, residual, *history, times)[0]
        expected = graphs.shallow(*call.tensors, residual)[0]
        # Two valid features: the residual moves on along the line through them.
        times[0] = 2
        moved = extrapolating(*call.tensors, residual, *history, times)[0]
    assert torch.equal(got, expected)
    assert (moved - expected).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("name", sorted(TINY))
def test_rule_applies_to_diffusers_transformers(request, name):
    tiny = TINY[name]
    model, kwargs, gm = request.getfixturevalue(name) if name in ("flux", "flux_guidance") else _captured(tiny)
    tensors = _tensors(model, kwargs)
    graphs, parts = split_dit(gm, 1, 1), split_dit_head(gm, 1, 1)
    with torch.no_grad():
        expected = model(**kwargs)[0] if isinstance(model(**kwargs), tuple) else model(**kwargs).sample
        *out, residual = graphs.full(*tensors)
        boundary = parts.head(*tensors)
        tail = parts.tail(*tensors, *boundary, residual)
        shallow = graphs.shallow(*tensors, residual)
    assert torch.equal(out[0], expected)
    assert torch.equal(tail[0], shallow[0])
    assert len(graphs.streams) == tiny.streams and graphs.streams[0].image
    assert not {b.path for b in graphs.middle} & {_block_of(n) for n in graphs.shallow.graph.nodes}


@pytest.mark.parametrize(("fn", "bn"), [(0, 0), (0, 2), (1, 5), (3, 3), (6, 0), (-1, 1), (1, -1), (1.5, 0)])
def test_bad_cuts_name_the_block_count(flux, fn, bn):
    _, _, gm = flux
    with pytest.raises(ValueError, match=r"this model's 6 transformer blocks: need integers Fn >= 1, Bn >= 0 and "
                                         r"Fn \+ Bn <= 5"):
        split_dit(gm, fn, bn)


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, sample, timestep):
        return self.proj(sample) * timestep


def test_a_model_without_blocks_is_refused():
    model = _NoBlocks()
    gm = capture(model, CallBinder(model).bind((torch.randn(2, 4), torch.tensor([1.0])), {})).graph_module
    with pytest.raises(ValueError, match="found no transformer blocks"):
        split_dit(gm, 1, 0)
