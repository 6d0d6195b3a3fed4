"""DeepCache on diffusion transformers through the public API: `dcfx.optimize(transformer,
DeepCacheConfig(first_blocks=Fn, last_blocks=Bn, ...))` and `dcfx.enable(pipe)` on a
FluxPipeline-like pipeline, against the plain model (interval 1) and against DBCache written by
hand with hooks (`_dbcache.HandCache`), for fixed schedules, adaptive gates, forecasts, `spent`,
true CFG and torch.compile; the family registry's checks; then every family of
`_tiny_transformers` at intervals 1 and 2.

Exactness: the graphs run the plain model's ATen ops in its order and the residual is added and
subtracted as the hooks do, so comparisons are bit for bit; a forecast's weights are computed in
float32 inside the graph, so forecasts are compared with `_tolerance`'s float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from _dbcache import HandCache
from _tiny_transformers import FLUX, TINY
from _tolerance import as_float64, assert_float32_close, assert_float32_far, float64_copy
from torch import nn

import dcfx
from dcfx import DeepCacheConfig
from dcfx.passes.families import TRANSFORMERS

STEPS = 6
# Cuts with a costly shallow graph warn when built; the tests of that warning record it themselves.
pytestmark = pytest.mark.filterwarnings("ignore:dcfx.*shallow graph:RuntimeWarning")
# Every class of `_tiny_transformers` is in the registry (checked exact below).
FAMILY_CUTS = {name: (1, 0) for name in TINY} | {"flux2": (3, 1), "sd3": (1, 1)}


@pytest.fixture(scope="module")
def flux():
    return FLUX.model()


def _output(out):
    return out[0] if isinstance(out, tuple) else out.sample


def trajectory(model, kwargs, steps=STEPS, before=None):
    """Outputs along a toy sampler: the timestep falls, the sample moves by each output (so a
    wrong cache changes later steps too). `before(i, t)` runs before each call."""
    x, t0, outs = kwargs["hidden_states"], kwargs["timestep"], []
    for i in range(steps):
        t = (t0 * (steps - i) / steps).to(t0.dtype)
        if before is not None:
            before(i, t)
        out = _output(model(**{**kwargs, "hidden_states": x, "timestep": t}, return_dict=False))
        outs.append(out)
        x = x - out[:, : x.shape[1]] / steps
    return outs


def by_hand(model, kwargs, fn, bn, decide, steps=STEPS, forecast=0):
    hand = HandCache(model, fn, bn, decide, forecast)

    def before(i, t):
        hand.step, hand.timestep = i, float(t.reshape(-1)[0])

    try:
        with torch.no_grad():
            return trajectory(model, kwargs, steps, before), hand.decisions
    finally:
        hand.remove()


def by_dcfx(model, kwargs, config, steps=STEPS):
    fast = dcfx.optimize(model, config)
    fast.begin(steps)
    with torch.no_grad():
        return trajectory(fast, kwargs, steps), fast


def assert_equal_steps(got, expected, plain=None, full=()):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"step {i}"
    if plain is not None:  # caching changed the shallow steps (the comparison means something)
        assert any((e - p).norm() > 1e-3 * p.norm() for i, (e, p) in enumerate(zip(expected, plain)) if i not in full)


# -- the config against the model ---------------------------------------------------------------

def test_a_transformer_defaults_to_first_block_cache(flux):
    fast = dcfx.optimize(flux, interval=2)
    assert (fast.deepcache_config.first_blocks, fast.deepcache_config.last_blocks) == (1, 0)
    assert "first_blocks=1, last_blocks=0" in repr(fast)


@pytest.mark.parametrize(("fn", "bn"), [(5, 1), (6, 0), (1, 5)])
def test_a_cut_beyond_the_blocks_names_the_block_count(flux, fn, bn):
    with pytest.raises(ValueError, match=rf"first_blocks={fn}, last_blocks={bn} do not fit FluxTransformer2DModel's "
                                         r"6 blocks: need first_blocks \+ last_blocks <= 5"):
        dcfx.optimize(flux, first_blocks=fn, last_blocks=bn)


def test_a_transformer_refuses_a_branch(flux):
    with pytest.raises(ValueError, match="is a transformer: set first_blocks/last_blocks"):
        dcfx.optimize(flux, branch=1)


def test_a_unet_refuses_transformer_blocks():
    from _tiny_unet import tiny_unet

    with pytest.raises(ValueError, match="set branch, not first_blocks/last_blocks"):
        dcfx.optimize(tiny_unet(), first_blocks=1)


def test_an_unknown_transformer_class_names_the_supported_ones():
    class MyTransformer2DModel(nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    with pytest.raises(ValueError, match="dcfx does not support MyTransformer2DModel: .* checked on "
                                         + ", ".join(sorted(TRANSFORMERS))):
        dcfx.optimize(MyTransformer2DModel())


def test_the_registry_is_the_tested_families():
    assert set(TRANSFORMERS) == {t.class_name for t in TINY.values()}


# -- against the plain model and DBCache by hand ------------------------------------------------

def test_interval_1_is_the_plain_model(flux):
    kwargs = FLUX.inputs()
    got, fast = by_dcfx(flux, kwargs, DeepCacheConfig(interval=1))
    with torch.no_grad():
        plain = trajectory(flux, kwargs)
    assert_equal_steps(got, plain)
    assert fast.history[-1] == "F" * STEPS


@pytest.mark.parametrize(("fn", "bn"), [(1, 0), (1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize(
    "schedule, full",
    [("uniform", (0, 3)), ((0, 2, 3), (0, 2, 3))],
    ids=["uniform", "explicit"],
)
def test_fixed_schedules_match_dbcache_by_hand(flux, fn, bn, schedule, full):
    kwargs = FLUX.inputs()
    expected, decisions = by_hand(flux, kwargs, fn, bn, lambda i, s: i in full)
    got, fast = by_dcfx(flux, kwargs, DeepCacheConfig(interval=3, schedule=schedule, first_blocks=fn, last_blocks=bn))
    with torch.no_grad():
        plain = trajectory(flux, kwargs)
    assert_equal_steps(got, expected, plain, full)
    assert fast.history[-1] == "".join("F" if d else "S" for d in decisions)


def test_the_nonuniform_schedule_matches_dbcache_by_hand(flux):
    # The paper's schedule for T = 50, N = 5 (c = 15, p = 1.4), as DEEPCACHE.md lists it.
    full = (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    kwargs = FLUX.inputs()
    expected, _ = by_hand(flux, kwargs, 1, 0, lambda i, s: i in full, steps=50)
    got, fast = by_dcfx(flux, kwargs, DeepCacheConfig(interval=5, schedule="nonuniform"), steps=50)
    assert_equal_steps(got, expected)
    assert [i for i, c in enumerate(fast.history[-1]) if c == "F"] == list(full)


def _relative_l1(x, reference):
    x, reference = x.double().flatten(1), reference.double().flatten(1)
    return float(((x - reference).abs().mean(1) / reference.abs().mean(1)).max())


class Gate:
    """The adaptive gates by hand: warmup steps full, then full when the signal reaches the
    threshold ("cut": the change since the last full step's signal; "accumulated": the
    step-to-step changes summed since the last full step) or after max_shallow shallow steps."""

    def __init__(self, kind, threshold, warmup=2, max_shallow=4):
        self.kind, self.threshold, self.warmup, self.max_shallow = kind, threshold, warmup, max_shallow
        self.kept, self.previous, self.total, self.run = None, None, 0.0, 0

    def __call__(self, step, signal):
        if step < self.warmup or self.run >= self.max_shallow:
            full = True
        elif self.kind == "cut":
            full = _relative_l1(signal, self.kept) >= self.threshold
        else:
            self.total += _relative_l1(signal, self.previous)
            full = self.total >= self.threshold
        self.previous = signal
        if full:
            self.kept, self.total, self.run = signal, 0.0, 0
        else:
            self.run += 1
        return full


@pytest.mark.parametrize(("kind", "threshold"), [("cut", 0.45), ("accumulated", 0.5)])
def test_adaptive_gates_match_dbcache_by_hand(flux, kind, threshold):
    kwargs = FLUX.inputs()
    steps = 10
    expected, decisions = by_hand(flux, kwargs, 1, 0, Gate(kind, threshold), steps=steps)
    got, fast = by_dcfx(flux, kwargs, DeepCacheConfig(adaptive=kind, threshold=threshold), steps=steps)
    history = "".join("F" if d else "S" for d in decisions)
    assert fast.history[-1] == history and "S" in history[2:] and "F" in history[2:]
    assert_equal_steps(got, expected)


@pytest.mark.parametrize("order", [1, 2])
def test_forecasts_match_dbcache_by_hand(flux, order):
    kwargs = FLUX.inputs()
    steps, every = 9, lambda i, s: i % 2 == 0
    got, fast = by_dcfx(flux, kwargs, DeepCacheConfig(interval=2, forecast=order, first_blocks=1, last_blocks=1), steps)
    expected32, _ = by_hand(flux, kwargs, 1, 1, every, steps, forecast=order)
    expected64, _ = by_hand(float64_copy(flux), as_float64(kwargs), 1, 1, every, steps, forecast=order)
    reused, _ = by_hand(flux, kwargs, 1, 1, every, steps)
    assert fast.history[-1] == "FSFSFSFSF"
    assert_float32_close(got, expected32, expected64, what=f"forecast {order}")
    assert_float32_far(reused, expected32, expected64, times=100, what="without the forecast")


def test_spent_counts_the_middle_as_skipped(flux):
    kwargs = FLUX.inputs()
    _, fast = by_dcfx(flux, kwargs, DeepCacheConfig(interval=3, first_blocks=1, last_blocks=1))
    spent = fast.spent
    assert spent.steps == "FSSFSS" and spent.runs == {"full": 2, "shallow": 4}
    cost = fast.graphs(**kwargs).cost
    assert spent.flops == 2 * cost.full + 4 * cost.shallow and spent.plain_flops == 6 * cost.full
    # 2 of 6 blocks run on a shallow step; the embedders and the output layers add little.
    assert 2 / 6 < cost.shallow_fraction < 2 / 6 + 0.05


def test_torch_compile_fullgraph_runs_without_breaks_or_recompiles(flux):
    """backend: a counting stand-in that runs the traced graph as is (no inductor); fullgraph=True
    raises at any graph break."""
    frames = []

    def counting(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    kwargs = FLUX.inputs()
    fast = torch.compile(dcfx.optimize(flux, interval=3), fullgraph=True, backend=counting)
    expected, _ = by_hand(flux, kwargs, 1, 0, lambda i, s: i % 3 == 0)
    for _ in range(2):
        fast.begin(STEPS)
        with torch.no_grad():
            got = trajectory(fast, kwargs)
        assert_equal_steps(got, expected)
    assert len(frames) == 2  # the full and the shallow graph, once each: no recompiles


# -- a pipeline: enable, true CFG ---------------------------------------------------------------

def tiny_flux_digits():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from dcfx.models.flux_digits import FluxDigitsPipeline, FluxLabelEmbedding, scheduler_config

    torch.manual_seed(0)
    config = {**FLUX.config, "in_channels": 4}
    pipe = FluxDigitsPipeline(FluxTransformer2DModel(**config).eval(),
                              FluxLabelEmbedding(tokens_per_class=4, dim=24, pooled_dim=12).eval(),
                              FlowMatchEulerDiscreteScheduler(**scheduler_config()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=STEPS, guidance=2.0):
    return pipe([3, 7], num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_enable_on_a_flux_pipeline_keeps_cond_and_uncond_apart():
    pipe = tiny_flux_digits()
    plain = _sample(pipe)
    transformer = pipe.transformer
    calls = {}

    def per_guidance_call(keyed):
        def pre(module, args, kwargs):
            key = id(kwargs["encoder_hidden_states"]) if keyed else None  # cond and uncond: tensors built once
            hand.key = key
            hand.step = calls[key] = calls.get(key, -1) + 1
        return pre

    by_key = {}
    for keyed in (True, False):  # a cache per guidance call, or one shared by both
        calls.clear()
        hand = HandCache(transformer, 1, 0, lambda i, s: i % 3 == 0)
        handle = transformer.register_forward_pre_hook(per_guidance_call(keyed), with_kwargs=True)
        try:
            by_key[keyed] = _sample(pipe)
        finally:
            handle.remove()
            hand.remove()
    separate, shared = by_key[True], by_key[False]
    fast = dcfx.enable(pipe, interval=3)
    got = _sample(pipe)
    assert fast.history[-1] == "FSSFSS" and fast.spent.runs == {"full": 4, "shallow": 8}
    assert torch.equal(got, separate)
    assert not torch.equal(separate, shared) and not torch.equal(got, plain)
    assert dcfx.disable(pipe) is transformer and pipe.transformer is transformer
    assert torch.equal(_sample(pipe), plain)


# -- every family -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_every_family_is_exact_at_interval_1(name):
    tiny = TINY[name]
    model, kwargs = tiny.model(), tiny.inputs()
    fn, bn = FAMILY_CUTS[name]
    got, fast = by_dcfx(model, kwargs, DeepCacheConfig(interval=1, first_blocks=fn, last_blocks=bn), steps=3)
    with torch.no_grad():
        plain = trajectory(model, kwargs, steps=3)
    assert_equal_steps(got, plain)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.slow
def test_every_family_matches_dbcache_by_hand_at_interval_2(name):
    tiny = TINY[name]
    model, kwargs = tiny.model(), tiny.inputs()
    fn, bn = FAMILY_CUTS[name]
    expected, _ = by_hand(model, kwargs, fn, bn, lambda i, s: i % 2 == 0, steps=4)
    got, fast = by_dcfx(model, kwargs, DeepCacheConfig(interval=2, first_blocks=fn, last_blocks=bn), steps=4)
    with torch.no_grad():
        plain = trajectory(model, kwargs, steps=4)
    assert fast.history[-1] == "FSFS"
    assert_equal_steps(got, expected, plain, full=(0, 2))


# -- report and the costly-cut warning ----------------------------------------------------------

@pytest.mark.slow
def test_report_prices_each_cut_of_a_transformer(flux):
    kwargs = FLUX.inputs()
    rep = dcfx.report(flux, **kwargs, config=DeepCacheConfig(interval=3), num_steps=10)
    assert [r.label for r in rep.branches] == ["F1B0", "F1B1", "F2B0", "F2B1", "F3B0", "F3B1"]
    assert rep.num_blocks == 6 and all(r.branch is None for r in rep.branches)
    for r in rep.branches:  # each row prices what the runtime runs at that cut
        fast = dcfx.optimize(flux, first_blocks=r.cut.first_blocks, last_blocks=r.cut.last_blocks)
        cost = fast.graphs(**kwargs).cost
        assert (r.full_flops, r.shallow_flops) == (cost.full, cost.shallow)
    by_label = {r.label: r for r in rep.branches}
    assert by_label["F1B0"].shallow_flops < by_label["F2B0"].shallow_flops < by_label["F3B0"].shallow_flops
    table = str(rep)
    assert "6 transformer blocks" in table and " cut " in table.splitlines()[1] and "F3B1" in table
    assert [r.label for r in dcfx.report(flux, **kwargs, cuts=[(2, 2)]).branches] == ["F2B2"]
    with pytest.raises(ValueError, match=r"a transformer's rows are cuts=\[\(Fn, Bn\), ...\]"):
        dcfx.report(flux, **kwargs, branches=[0])


def _warnings_of(fast, *args, **kwargs):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fast(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.slow
def test_a_costly_cut_warns_once_per_model_with_the_reports_figure():
    model, kwargs = FLUX.model(), FLUX.inputs()
    assert _warnings_of(dcfx.optimize(model, first_blocks=1, last_blocks=0), **kwargs) == []  # 14.8%
    row = dcfx.report(model, **kwargs, cuts=[(3, 1)]).branches[0]
    (message,) = _warnings_of(dcfx.optimize(model, first_blocks=3, last_blocks=1), **kwargs)
    assert "FluxTransformer2DModel at F3B1 (the first 3 and the last 1 of 6 transformer blocks" in message
    assert f"costs {100 * row.shallow_fraction:.1f}% of the full graph's FLOPs" in message
    assert _warnings_of(dcfx.optimize(model, first_blocks=4, last_blocks=1), **kwargs) == []  # once per model


@pytest.mark.slow
def test_a_costly_unet_branch_warns_too():
    from _tiny_unet import CROSS_DIM, LATENT, TOKENS, tiny_unet

    unet = tiny_unet()
    args = (torch.randn(2, 4, LATENT, LATENT), torch.tensor(900), torch.randn(2, TOKENS, CROSS_DIM))
    rows = dcfx.report(unet, *args, num_steps=10).branches
    costly = next(r for r in rows if r.shallow_fraction > 0.5)
    (message,) = _warnings_of(dcfx.optimize(unet, branch=costly.branch), *args)
    assert f"at branch {costly.branch} (skip connections 0..{len(rows) - 1}): the shallow graph" in message
    assert f"costs {100 * costly.shallow_fraction:.1f}%" in message


# -- calibrate and cuda_graphs ------------------------------------------------------------------

@pytest.mark.slow
def test_calibrate_fits_a_schedule_on_a_flux_pipeline():
    pipe = tiny_flux_digits()
    config = dcfx.calibrate(pipe, [[1, 2], [3, 4]], budget=3, num_inference_steps=STEPS, guidance_scale=2.0)
    assert (config.first_blocks, config.last_blocks) == (1, 0) and config.schedule[0] == 0
    assert config.calibration.model_name == "FluxTransformer2DModel" and config.calibration.num_steps == STEPS
    fast = dcfx.enable(pipe, config)
    _sample(pipe)
    history = fast.history[-1]
    assert [i for i, c in enumerate(history) if c == "F"] == list(config.schedule)
    assert fast.spent.cost <= 3  # the budget, in full-step equivalents


@pytest.mark.parametrize("options", [dict(interval=3), dict(adaptive="cut", threshold=0.3, max_shallow=2)],
                         ids=["uniform", "cut"])
@pytest.mark.slow
def test_cuda_graphs_steps_match_the_eager_runtime(options):
    """The CPU path of `dcfx.cuda_graphs` (the same step phases, uncaptured) on a FluxPipeline-
    shaped call (`example_call`): the same graphs on the same inputs, so bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dcfx.models import example_call

    transformer = tiny_flux_digits().transformer
    call = example_call(transformer, 2, tokens=4)
    fast, reference = dcfx.optimize(transformer, **options), dcfx.optimize(transformer, **options)
    static_x, static_t = call.args[0].clone(), call.kwargs["timestep"].clone()
    kwargs = {**call.kwargs, "timestep": static_t}
    scheduler = FlowMatchEulerDiscreteScheduler()
    with torch.no_grad():
        graphs = dcfx.cuda_graphs(fast, static_x, capture=False, **kwargs)
        for generation in range(2):
            scheduler.set_timesteps(8)
            latents = torch.randn(call.args[0].shape, generator=torch.Generator().manual_seed(generation))
            reference.begin(8)
            for i, t in enumerate(scheduler.timesteps):
                static_x.copy_(latents)
                static_t.fill_(float(t) / 1000)
                v = graphs.step(i, 8).sample.clone()
                expected = reference(latents, **{**kwargs, "timestep": static_t.clone()}).sample
                assert torch.equal(v, expected), f"generation {generation} step {i}"
                latents = scheduler.step(expected, t, latents).prev_sample
            assert graphs.history == reference.history[-1] and "S" in graphs.history


# -- an AOT package -----------------------------------------------------------------------------

@pytest.mark.aot
@pytest.mark.inductor
def test_a_packaged_flux_transformer_runs_like_uncompiled_dcfx(flux, tmp_path):
    from dcfx.aot import load_package, package

    kwargs = FLUX.inputs()
    config = DeepCacheConfig(interval=2, first_blocks=2, last_blocks=0)
    path = package(dcfx.optimize(flux, config), tmp_path / "flux.pt2", **kwargs)
    loaded = load_package(path)
    assert loaded.deepcache_config == dcfx.optimize(flux, config).deepcache_config
    loaded.begin(4)
    with torch.no_grad():
        got = trajectory(loaded, kwargs, steps=4)
    reference32, _ = by_dcfx(flux, kwargs, config, steps=4)
    reference64, _ = by_dcfx(float64_copy(flux), as_float64(kwargs), config, steps=4)
    assert loaded.history[-1] == "FSFS"
    assert_float32_close(got, reference32, reference64, what="the package")
    refused = r"holds the graphs of F2B0 \(the first 2 .*\); a config with cut F1B0 needs another package"
    with pytest.raises(ValueError, match=refused):
        dcfx.optimize(loaded, DeepCacheConfig(interval=2, first_blocks=1, last_blocks=0))
