"""Adaptive gating, forecasts and calibrated schedules, each checked against a hand-written
DeepCache loop on the plain U-Net (a pre-hook on the resnet at the cut sees cat([h_b, s_b])
and decides itself what h_b to use), never dcfx against itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, Recorder, skip_channels, skip_consumer, small_unet, tiny_unet
from _tolerance import assert_float32_close, assert_float32_far, float64_copy
from diffusers import DDIMScheduler

import dcfx
from dcfx.costs import full_steps_for
from dcfx.policies.calibrate import choose_full_steps, spearman

STEPS = 10
# dcfx against the hand-written loops: float32 against float64 (tests/_tolerance.py). A policy
# that changes what the shallow steps compute moves the result by more than FAR such bounds.
FAR = 100


class Hand:
    """DeepCache by hand: `gate(step, s_b, h_b)` returns the h_b the step uses (h_b itself on
    a full step). The deep path still runs on shallow steps; its result is dropped."""

    def __init__(self, unet, branch, gate):
        self.unet, self.gate = unet, gate
        self.layer = skip_consumer(unet, branch)
        self.skip = skip_channels(unet)[branch]
        self.step = 0

    def _hook(self, module, args):
        x = args[0]
        keep = x.shape[1] - self.skip
        h = self.gate(self.step, x[:, keep:], x[:, :keep])
        return (torch.cat([h, x[:, keep:]], dim=1), *args[1:])

    def __call__(self, *args, **kwargs):
        handle = self.layer.register_forward_pre_hook(self._hook)
        try:
            with torch.no_grad():
                return self.unet(*args, **kwargs)
        finally:
            handle.remove()
            self.step += 1


def rel(x, ref):
    x, ref = x.double().flatten(1), ref.double().flatten(1)
    return float(((x - ref).abs().mean(1) / ref.abs().mean(1)).max())


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=4)


@pytest.fixture(scope="module")
def unet64(unet):
    return float64_copy(unet)


def sample(u, seed=0, batch=2, steps=STEPS, before_call=None, dtype=torch.float32):
    """A DDIM generation with U-Net `u` (dcfx or a Hand): every step's output. The noise is
    drawn in float32 whatever `dtype`, so a float64 run starts where the float32 one does."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g).to(dtype)
    e = torch.randn(batch, TOKENS, CROSS_DIM, generator=g).to(dtype)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            if before_call is not None:
                before_call(x, t)
            eps = u(x, t, encoder_hidden_states=e).sample
            outs.append(eps)
            x = sched.step(eps, t, x).prev_sample
    return outs


def assert_outputs_equal(got, expected):
    """The same graphs on the same inputs: bit for bit."""
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"step {i}: {m}")


# -- forecast -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_matches_a_hand_written_extrapolation(unet, unet64, order):
    interval = 3

    def by_hand(u, dtype):
        timesteps = []
        history: list[tuple[float, torch.Tensor]] = []  # (t, h) of full steps, newest first

        def gate(step, s, h):
            t = timesteps[step]
            if step % interval == 0:
                history.insert(0, (t, h.clone()))
                return h
            points = history[: order + 1]  # Lagrange through the last order+1 full steps
            out = torch.zeros_like(h)  # in h's dtype: float32 rounds the weighted sum as dcfx does
            for i, (ti, hi) in enumerate(points):
                w = math.prod((t - tj) / (ti - tj) for j, (tj, _) in enumerate(points) if j != i)
                out += w * hi
            return out

        return sample(Hand(u, 1, gate), before_call=lambda x, t: timesteps.append(float(t)), dtype=dtype)

    expected32, expected64 = by_hand(unet, torch.float32), by_hand(unet64, torch.float64)
    fast = dcfx.optimize(unet, interval=interval, branch=1, forecast=order)
    got = sample(fast)
    assert fast.history == ("FSSFSSFSSF",)
    assert_float32_close(got, expected32, expected64, what=f"forecast order {order}")
    # the forecast is not the plain reuse: it changes the shallow steps
    reuse = sample(dcfx.optimize(unet, interval=interval, branch=1))
    assert_float32_far(reuse, expected32, expected64, times=FAR, what="plain reuse against the forecast")


def test_forecast_restarts_in_each_generation(unet):
    # A second generation must not extrapolate from the first one's features.
    fast = dcfx.optimize(unet, interval=3, branch=1, forecast=2)
    first = sample(fast, seed=0)
    second = sample(fast, seed=1)
    fresh = sample(dcfx.optimize(unet, interval=3, branch=1, forecast=2), seed=1)
    assert fast.history == ("FSSFSSFSSF",) * 2
    assert_outputs_equal(second, fresh)
    assert len(first) == STEPS


def test_forecast_keeps_one_more_tensor_per_order(unet):
    x, e = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, TOKENS, CROSS_DIM)
    cuts = {order: dcfx.optimize(unet, interval=3, forecast=order).graphs(x, 900, e).cut for order in (1, 2)}
    assert [c.name for c in cuts[1].cached] == ["deepcache_feature", "deepcache_feature_1", "deepcache_times"]
    assert [c.name for c in cuts[2].cached] == [
        "deepcache_feature", "deepcache_feature_1", "deepcache_feature_2", "deepcache_times"
    ]
    feature = cuts[1].cached[0].nbytes
    assert feature == 2 * 32 * LATENT * LATENT * 4  # batch 2, 32 channels at s0, float32
    assert cuts[2].cached_bytes - cuts[1].cached_bytes == feature + 4  # one more feature and time


# -- adaptive -------------------------------------------------------------------------------


class Gate:
    """The adaptive gate, written out: warm-up, threshold, at most `max_shallow` in a row."""

    def __init__(self, signal, threshold, warmup=2, max_shallow=3, rescale=None):
        self.signal, self.threshold = signal, threshold
        self.warmup, self.max_shallow, self.rescale = warmup, max_shallow, rescale
        self.run, self.total, self.ref, self.prev, self.h = 0, 0.0, None, None, None
        self.pattern = ""
        self.samples: list[torch.Tensor] = []

    def decide(self, step, s):
        if step < self.warmup or self.run >= self.max_shallow:
            return True
        if self.signal == "cut":
            return rel(s, self.ref) >= self.threshold
        if self.signal == "accumulated":
            change = rel(s, self.prev)
            self.total += max(float(np.polyval(self.rescale, change)) if self.rescale else change, 0.0)
            return self.total >= self.threshold
        if len(self.samples) < 4:
            return True
        x0, x1, x2, x3 = (t.double().flatten(1) for t in self.samples[-1:-5:-1])
        third = (x0 - 3 * x1 + 3 * x2 - x3).abs().mean(1)
        first = (x0 - x1).abs().mean(1)
        return float((third / first).max()) >= self.threshold

    def __call__(self, step, s, h):
        full = self.decide(step, s)
        self.pattern += "F" if full else "S"
        if full:
            self.run, self.total, self.ref, self.h = 0, 0.0, s.clone(), h.clone()
        else:
            self.run += 1
        self.prev = s.clone()
        return h if full else self.h


@pytest.mark.parametrize(
    ("signal", "threshold", "rescale"),
    [("cut", 0.6, None), ("accumulated", 0.6, None), ("accumulated", 0.6, (0.5, 0.8, 0.0)), ("latent", 1.0, None)],
)
def test_adaptive_matches_a_hand_written_gate(unet, unet64, signal, threshold, rescale):
    def by_hand(u, dtype):
        gate = Gate(signal, threshold, rescale=rescale)
        return sample(Hand(u, 1, gate), before_call=lambda x, t: gate.samples.append(x.clone()), dtype=dtype), gate.pattern

    (expected32, pattern), (expected64, pattern64) = by_hand(unet, torch.float32), by_hand(unet64, torch.float64)
    assert pattern64 == pattern  # float64 decides alike: a reference for every step
    options = dict(rescale=rescale) if rescale else {}
    fast = dcfx.optimize(unet, branch=1, adaptive=signal, threshold=threshold, warmup=2, max_shallow=3, **options)
    got = sample(fast)
    assert fast.history == (pattern,)
    assert "S" in pattern and pattern.count("F") > 2, pattern  # the gate did gate
    assert_float32_close(got, expected32, expected64, what=signal)
    spent = fast.spent
    assert spent.full_steps == pattern.count("F") and spent.shallow_steps == pattern.count("S")


def test_adaptive_with_forecast(unet, unet64):
    gate = Gate("cut", 0.6)
    options = dict(branch=1, adaptive="cut", threshold=0.6, max_shallow=3)
    fast = dcfx.optimize(unet, **options, forecast=1)
    got = sample(fast)
    pattern = fast.history[0]
    assert "S" in pattern
    reuse = dcfx.optimize(unet, **options)
    plain_reuse = sample(reuse)
    if reuse.history[0] == pattern:  # same decisions: only the forecast differs
        fast64 = dcfx.optimize(unet64, **options, forecast=1)
        got64 = sample(fast64, dtype=torch.float64)
        assert fast64.history == fast.history
        shallow = [i for i, p in enumerate(pattern) if p == "S"]
        pick = lambda steps: [steps[i] for i in shallow]  # noqa: E731
        assert_float32_far(pick(plain_reuse), pick(got), pick(got64), times=FAR, what="reuse against the forecast")
    assert gate.threshold == 0.6


def test_one_decision_per_step_for_separate_guidance_calls(unet, unet64):
    # The first call of a step decides (its signal); the second call follows, with its own cache.
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, LATENT, LATENT, generator=g)
    uncond, cond = torch.randn(1, TOKENS, CROSS_DIM, generator=g), torch.randn(1, TOKENS, CROSS_DIM, generator=g)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)

    def loop(u_first, u_second, dtype=torch.float32):
        x, outs = x0.to(dtype), []
        with torch.no_grad():
            for t in sched.timesteps:
                a = u_first(x, t, encoder_hidden_states=uncond.to(dtype)).sample
                b = u_second(x, t, encoder_hidden_states=cond.to(dtype)).sample
                outs += [a, b]
                x = sched.step(a + 2.0 * (b - a), t, x).prev_sample
        return outs

    def by_hand(u, dtype):
        gate = Gate("cut", 0.6)
        follow = {"h": None}

        def second(step, s, h):  # the cond call takes the first call's decision, keeps its own h
            full = gate.pattern[step] == "F"
            if full:
                follow["h"] = h.clone()
            return h if full else follow["h"]

        return loop(Hand(u, 1, gate), Hand(u, 1, second), dtype), gate.pattern

    (expected32, pattern), (expected64, pattern64) = by_hand(unet, torch.float32), by_hand(unet64, torch.float64)
    fast = dcfx.optimize(unet, branch=1, adaptive="cut", threshold=0.6, warmup=2, max_shallow=3)
    got = loop(fast, fast)
    assert fast.history == (pattern,) and pattern64 == pattern and "S" in pattern
    assert_float32_close(got, expected32, expected64, what="separate guidance calls")


# -- calibration ----------------------------------------------------------------------------


def test_dynamic_programming_finds_the_best_schedule():
    rng = np.random.default_rng(0)
    T = 7
    error = np.triu(rng.random((T, T)) + np.arange(T)[None, :] * 0.1, 1)

    def cost(steps):
        full = set(steps)
        total, last = 0.0, 0
        for k in range(T):
            if k in full:
                last = k
            else:
                total += error[last, k]
        return total

    import itertools

    for count in range(1, T + 1):
        best = min((s for s in itertools.combinations(range(1, T), count - 1)), key=lambda s: cost((0, *s)))
        chosen = choose_full_steps(error, count)
        assert chosen[0] == 0 and len(chosen) == count
        assert cost(chosen) == pytest.approx(cost((0, *best)))


def test_budget_arithmetic_and_errors():
    assert full_steps_for(50, 50, 0.1) == 50
    assert full_steps_for(10, 50, 0.1) == 5  # 5 + 45 * 0.1 = 9.5 <= 10
    with pytest.raises(ValueError, match="above the step count"):
        full_steps_for(51, 50, 0.1)
    with pytest.raises(ValueError, match="below the cheapest schedule"):
        full_steps_for(2, 50, 0.1)
    assert spearman([1, 2, 3, 4], [10, 20, 25, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def _loop(sched, steps=8, seeds=(0, 1)):
    def run(u):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(2, 4, LATENT, LATENT, generator=g)
            e = torch.randn(2, TOKENS, CROSS_DIM, generator=g)
            sched.set_timesteps(steps)
            u.begin(steps)
            with torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(u(x, t, e).sample, t, x).prev_sample
    return run


def test_calibrated_schedule_is_the_best_reuse_and_round_trips(unet, tmp_path):
    sched = DDIMScheduler(num_train_timesteps=1000)
    config = dcfx.calibrate(unet, _loop(sched), budget=6, branch=1, scheduler=sched)
    c = config.calibration
    assert c.num_steps == 8 and c.scheduler_name == "DDIMScheduler" and config.schedule[0] == 0
    report = dcfx.report(unet, torch.randn(2, 4, LATENT, LATENT), 900, torch.randn(2, TOKENS, CROSS_DIM),
                         config=dcfx.DeepCacheConfig(branch=1), branches=[1])
    ratio = report.branches[0].shallow_fraction
    count = len(config.schedule)
    assert count + (8 - count) * ratio <= 6 < count + 1 + (7 - count) * ratio  # as many as the budget buys
    names = dict(c.correlations)
    assert set(names) >= {"cut since full", "accumulated since full", "latent since full"}
    assert len(c.rescale) == 3

    # Reference: the hand loop's summed reuse error for the chosen schedule is no larger than
    # for the uniform schedule with as many full steps.
    def reuse_error(full_steps):
        features = {}

        def gate(step, s, h):
            features[step] = h.clone()
            return h

        _loop(sched, seeds=(0,))(_Begin(Hand(unet, 1, gate)))
        last, total = 0, 0.0
        for k in range(8):
            if k in full_steps:
                last = k
            else:
                total += rel(features[k], features[last])
        return total

    uniform = tuple(range(0, 8, math.ceil(8 / count)))[:count]
    assert reuse_error(config.schedule) <= reuse_error(uniform)  # equal schedules: the same sum, bit for bit

    path = tmp_path / "schedule.json"
    config.save(path)
    loaded = dcfx.DeepCacheConfig.load(path)
    assert loaded == config and hash(loaded.calibration) == hash(config.calibration)
    fast = dcfx.optimize(unet, loaded)
    _loop(sched, seeds=(3,))(fast)
    assert fast.history[-1] == "".join("F" if i in config.schedule else "S" for i in range(8))


class _Begin:
    """A Hand with the begin() a calibration loop calls."""

    def __init__(self, hand):
        self.hand = hand

    def begin(self, num_steps):
        self.hand.step = 0

    def __call__(self, *args, **kwargs):
        return self.hand(*args, **kwargs)


def test_calibrated_schedule_is_refused_elsewhere(unet, tmp_path):
    sched = DDIMScheduler(num_train_timesteps=1000)
    config = dcfx.calibrate(unet, _loop(sched, steps=6, seeds=(0,)), budget=4, scheduler=sched)
    with pytest.raises(ValueError, match="calibrated for another model"):
        dcfx.optimize(tiny_unet(seed=9), config)
    fast = dcfx.optimize(unet, config)
    with pytest.raises(ValueError, match="calibrated for 6 steps"):
        fast.begin(8)

    class Pipe:
        def __init__(self, scheduler):
            self.unet, self.scheduler = unet, scheduler

    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="calibrated with DDIMScheduler"):
        dcfx.enable(Pipe(EulerDiscreteScheduler(num_train_timesteps=1000)), config)
    other = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    with pytest.raises(ValueError, match="calibrated with DDIMScheduler"):
        dcfx.enable(Pipe(other), config)
    pipe = Pipe(DDIMScheduler(num_train_timesteps=1000))
    dcfx.enable(pipe, config)  # the same scheduler configuration is fine
    with pytest.raises(ValueError, match="calibrated for 6 steps"):
        pipe.scheduler.set_timesteps(8)
    path = tmp_path / "not-a-config.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a dcfx config file"):
        dcfx.DeepCacheConfig.load(path)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(adaptive="cut", threshold=0), "threshold must be a number > 0"),
        (dict(adaptive="cut", threshold=-0.1), "threshold must be a number > 0"),
        (dict(adaptive="sharp"), r"adaptive must be None, True or one of \('cut', 'accumulated', 'latent'\)"),
        (dict(interval=1, forecast=1), "forecast needs shallow steps"),
        (dict(forecast=3), r"forecast must be one of \(0, 1, 2\)"),
        (dict(adaptive="cut", warmup=0), "warmup must be an integer >= 1"),
        (dict(adaptive="cut", max_shallow=0), "max_shallow must be an integer >= 1"),
        (dict(adaptive="cut", rescale=(1.0, 0.0)), "rescale applies to adaptive='accumulated' only"),
    ],
)
def test_bad_policy_options(options, match):
    with pytest.raises(ValueError, match=match):
        dcfx.DeepCacheConfig(**options)


def test_adaptive_true_is_the_default_signal():
    assert dcfx.DeepCacheConfig(adaptive=True).adaptive == "cut"


# -- cost -----------------------------------------------------------------------------------


def test_every_signal_is_a_setting_and_its_source_splits_the_graphs():
    from dcfx.config import SIGNALS as SETTINGS
    from dcfx.policies import SIGNALS
    from dcfx.policies.adaptive import CUT

    assert set(SIGNALS) == set(SETTINGS)
    for name, signal in SIGNALS.items():
        assert dcfx.DeepCacheConfig(adaptive=name).needs_head == (signal.source == CUT), name


def test_spent_counts_flops_as_report_does(unet):
    x, e = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, TOKENS, CROSS_DIM)
    report = dcfx.report(unet, x, 900, e, config=dcfx.DeepCacheConfig(interval=3, branch=1), branches=[1], num_steps=STEPS)
    row = report.branches[0]
    for config in (dict(interval=3), dict(adaptive="cut", threshold=0.6)):
        fast = dcfx.optimize(unet, branch=1, **config)
        sample(fast)
        spent = fast.spent
        full, shallow = spent.full_steps, spent.shallow_steps
        assert spent.plain_flops == STEPS * row.full_flops
        assert spent.flops == full * row.full_flops + shallow * row.shallow_flops
        assert spent.cost == pytest.approx(full + shallow * row.shallow_fraction)
    assert fast.spent.runs["head"] == STEPS  # the head ran at every step, no work twice
    assert "full-step equivalents" in str(fast.spent)


# -- the CUDA-graph helper (uncaptured on a CPU: the same steps, the same buffers) -----------


@pytest.mark.parametrize(
    "options",
    [dict(interval=3), dict(interval=3, forecast=2), dict(adaptive="cut", threshold=0.6, max_shallow=3),
     dict(adaptive="latent", threshold=1.0, max_shallow=3), dict(adaptive="accumulated", threshold=0.6, forecast=1)],
    ids=["uniform", "forecast", "cut", "latent", "accumulated-forecast"],
)
def test_cuda_graph_helper_steps_like_the_runtime(unet, options):
    # The runtime is checked against hand-written loops above; the helper must take the same
    # decisions and give the same outputs, for two generations in a row.
    fast = dcfx.optimize(unet, branch=1, **options)
    expected = [sample(fast, seed=s) for s in (0, 1)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=g)
    t = torch.tensor(999)
    e = torch.randn(2, TOKENS, CROSS_DIM, generator=g)
    graphs = dcfx.cuda_graphs(dcfx.optimize(unet, branch=1, **options), x, t, encoder_hidden_states=e, capture=False)

    class Replayed:
        def __init__(self):
            self.i = 0

        def __call__(self, sample_, t_, encoder_hidden_states):
            x.copy_(sample_), t.copy_(t_), e.copy_(encoder_hidden_states)
            out = graphs.step(self.i, STEPS).sample.clone()
            self.i += 1
            return type("Out", (), {"sample": out})

    for seed, reference in zip((0, 1), expected):
        got = sample(Replayed(), seed=seed)
        assert graphs.history == fast.history[seed]
        assert_outputs_equal(got, reference)


# -- compiled, in every order; threads ---------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "order"),
    [
        # The head-gated policy with a forecast (three graphs, the most inputs) in each order,
        # and the other two policies in one order each (each compile is a dynamo trace).
        (dict(adaptive="cut", threshold=0.6, forecast=1), "fast.compile"),
        (dict(adaptive="cut", threshold=0.6, forecast=1), "torch.compile(fast)"),
        (dict(adaptive="cut", threshold=0.6, forecast=1), "unet.compile()"),
        (dict(adaptive="latent", threshold=1.0), "torch.compile(fast)"),
        (dict(interval=3, forecast=2), "unet.compile()"),
    ],
    ids=["cut-forecast-fast.compile", "cut-forecast-torch.compile", "cut-forecast-unet.compile", "latent", "forecast"],
)
def test_policies_compile_in_every_order(options, order):
    unet = small_unet(seed=4)  # the smallest with the cut: dynamo traces every op
    expected_fast = dcfx.optimize(unet, branch=1, **options)
    expected = sample(expected_fast)
    backend = Recorder()
    if order == "fast.compile":
        fast = dcfx.optimize(unet, branch=1, **options)
        fast.compile(backend=backend)
        run = fast
    elif order == "torch.compile(fast)":
        fast = dcfx.optimize(unet, branch=1, **options)
        run = torch.compile(fast, backend=backend)
    else:
        compiled = small_unet(seed=4)
        compiled.compile(backend=backend)
        fast = run = dcfx.optimize(compiled, branch=1, **options)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = sample(run)
    assert fast.history == expected_fast.history
    assert_outputs_equal(got, expected)
    kinds = {"head", "rest", "tail"} if options.get("adaptive") == "cut" else {"full", "shallow"}
    assert len(backend.graphs) == len(kinds)  # each graph compiled whole, once


def test_threads_sharing_an_adaptive_unet_equal_serial_runs(unet):
    import threading

    options = dict(branch=1, adaptive="accumulated", threshold=0.6, forecast=1)
    serial = {seed: sample(dcfx.optimize(unet, **options), seed=seed) for seed in (0, 1)}
    shared = dcfx.optimize(unet, **options)
    results, errors = {}, []

    def job(seed):
        try:
            results[seed] = (sample(shared, seed=seed), shared.history)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed in (0, 1):
        assert_outputs_equal(results[seed][0], serial[seed])
        assert len(results[seed][1]) == 1  # each thread its own generation
