"""Which compile setting a call of a dcfx U-Net uses (issue 15, parts A and B).

A: disabled compiling compiles nothing: `unet.compile(disable=True)` before `optimize`,
`fast.compile(disable=True)`, `torch.compiler.disable` around the U-Net or around dcfx's
module, and `TORCHDYNAMO_DISABLE=1`, each also over `compile=True` in the config.
B: the setting is the calling thread's own: two threads, one under a torch.compile wrapper
and one not, each get their own route, and the results each gets alone.

Every graph dcfx hands to torch.compile goes to a recording dynamo backend here (the
`compiled` fixture stands in for inductor), so these tests never run inductor, and dynamo
traces the smallest U-Net with the cut. Results are
checked against `ReferenceDeepCache`, DeepCache done by hand on the plain U-Net (in float32
and float64).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, ReferenceDeepCache, small_unet, uniform
from _tolerance import assert_float32_close
from test_compile_orders import Recorder

import dcfx
from dcfx import compile as dcfx_compile

INTERVAL = 2
STEPS = 4
TIMESTEPS = [999 - 150 * i for i in range(STEPS)]


@pytest.fixture
def compiled(monkeypatch):
    """The recorder every graph goes to that dcfx compiles with inductor (named by string);
    graphs of other backends (a recorder of the test's own) go to those."""
    stand_in = Recorder()

    def compile(self, graph):
        backend = stand_in if isinstance(self.backend, str) else self.backend
        return torch.compile(graph, fullgraph=True, dynamic=False, backend=backend)

    monkeypatch.setattr(dcfx_compile.Compiler, "compile", compile)
    return stand_in


@pytest.fixture(scope="module")
def unet():
    return small_unet(seed=0)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, TOKENS, CROSS_DIM, generator=g)


def generation(model, x, e, after_first=lambda: None) -> list[torch.Tensor]:
    model.begin(STEPS)
    outputs = []
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            outputs.append(model(x + 0.1 * i, t, encoder_hidden_states=e).sample)
            if i == 0:
                after_first()
    return outputs


def expected(unet, x, e) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same generation by hand on the plain U-Net, per step in float32 and float64."""
    oracle = ReferenceDeepCache(unet, branch=0)
    return [
        oracle(mode, x + 0.1 * i, t, encoder_hidden_states=e)
        for i, (t, mode) in enumerate(zip(TIMESTEPS, uniform(STEPS, INTERVAL)))
    ]


def assert_matches(outputs, reference):
    """Full steps run the exported U-Net's own ops (the recorder runs what dynamo traced): bit
    for bit; shallow steps (the fused cut normalises in another order) against the float64
    reference, as tests/_tolerance.py says."""
    for i, (mode, out, (ref32, ref64)) in enumerate(zip(uniform(STEPS, INTERVAL), outputs, reference, strict=True)):
        if mode == "F":
            torch.testing.assert_close(out, ref32, rtol=0, atol=0)
        else:
            assert_float32_close(out, ref32, ref64, what=f"step {i}")


def dcfx_module(model):
    return getattr(model, "_orig_mod", model)


# -- A: disabled means nothing is compiled ------------------------------------------------------


def test_the_stand_in_backend_sees_every_compile(unet, compiled):
    # The control for the tests below: with compiling on, both graphs reach the recorder.
    x, e = inputs()
    fast = dcfx.optimize(unet, interval=INTERVAL, compile=True)
    assert_matches(generation(fast, x, e), expected(unet, x, e))
    assert compiled.fused() == [False, True] and set(fast.compile_seconds) == {"full[0]", "shallow[0]"}


def build(way: str, unet):
    """A dcfx U-Net (or a module around one) for one way of disabling compilation, each over
    a config that asks for compile=True."""
    if way == "unet.compile(disable=True)":
        own = small_unet(seed=0)  # compiling marks the module: its own copy
        own.compile(disable=True)
        return dcfx.optimize(own, interval=INTERVAL, compile=True)
    if way == "fast.compile(disable=True)":
        fast = dcfx.optimize(unet, interval=INTERVAL, compile=True)
        fast.compile(disable=True)
        return fast
    if way == "optimize(torch.compiler.disable(unet))":
        return dcfx.optimize(torch.compiler.disable(unet), interval=INTERVAL, compile=True)
    if way == "torch.compiler.disable(optimize(unet))":
        return torch.compiler.disable(dcfx.optimize(unet, interval=INTERVAL, compile=True))
    raise AssertionError(way)


@pytest.mark.parametrize(
    "way",
    [
        "unet.compile(disable=True)",
        "fast.compile(disable=True)",
        "optimize(torch.compiler.disable(unet))",
        "torch.compiler.disable(optimize(unet))",
    ],
)
def test_disabled_compiling_compiles_nothing(unet, compiled, way):
    x, e = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "could not read the torch.compile settings"
        model = build(way, unet)
        outputs = generation(model, x, e)
    assert_matches(outputs, expected(unet, x, e))
    fast = dcfx_module(model)
    assert compiled.graphs == [] and fast.compile_seconds == {}
    assert fast.history == (uniform(STEPS, INTERVAL),)
    if way != "torch.compiler.disable(optimize(unet))":  # the module's own setting is off
        assert fast.deepcache_config.compile is False


@pytest.mark.parametrize("way", ["compile=True", "fast.compile(backend)", "torch.compile(fast)", "unet.compile(backend)"])
def test_torchdynamo_disable_compiles_nothing(unet, compiled, monkeypatch, way):
    # torch reads the variable at each torch.compile call.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    own = Recorder()
    x, e = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if way == "compile=True":
            model = dcfx.optimize(unet, interval=INTERVAL, compile=True)
        elif way == "fast.compile(backend)":
            model = dcfx.optimize(unet, interval=INTERVAL)
            model.compile(backend=own)
        elif way == "torch.compile(fast)":
            model = torch.compile(dcfx.optimize(unet, interval=INTERVAL), backend=own)
        else:
            plain = small_unet(seed=0)
            plain.compile(backend=own)
            model = dcfx.optimize(plain, interval=INTERVAL)
        outputs = generation(model, x, e)
    assert_matches(outputs, expected(unet, x, e))
    assert compiled.graphs == [] and own.graphs == []
    assert dcfx_module(model).compile_seconds == {}


# -- B: each thread its own route ---------------------------------------------------------------


def _in_thread(target, results, key):
    def run():
        try:
            results[key] = target()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            results[key] = e

    return threading.Thread(target=run, name=key)


@pytest.mark.parametrize("other", ["torch.compiler.disable wrapper", "no wrapper"])
def test_two_threads_each_take_their_own_compile_route(compiled, other):
    unet_a, unet_b = small_unet(seed=0), small_unet(seed=1)
    (xa, ea), (xb, eb) = inputs(seed=0), inputs(seed=1)
    expected_a, expected_b = expected(unet_a, xa, ea), expected(unet_b, xb, eb)

    backend_a = Recorder()
    fast_a = dcfx.optimize(unet_a, interval=INTERVAL)
    model_a = torch.compile(fast_a, backend=backend_a)  # thread A: compiled by its wrapper
    fast_b = dcfx.optimize(unet_b, interval=INTERVAL)  # thread B: uncompiled
    model_b = torch.compiler.disable(fast_b) if other == "torch.compiler.disable wrapper" else fast_b

    # Interleaved so that A's first call starts inside B's first call (inside B's wrapper, if
    # any) and reads its route after B's call has left it, before B's next call: a
    # process-wide "inside a compiled module" flag would then say "not compiled" to A.
    b_in, a_in, b_out, a_done = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    first_a_compiled = []

    def hold_b(module, args, kwargs):
        if not b_in.is_set():
            b_in.set()
            assert a_in.wait(120), "thread A never started its first call"

    def hold_a(module, args, kwargs):
        if not a_in.is_set():
            a_in.set()
            assert b_out.wait(120), "thread B never finished its first call"

    fast_b.register_forward_pre_hook(hold_b, with_kwargs=True)
    fast_a.register_forward_pre_hook(hold_a, with_kwargs=True)

    def after_first_a():
        first_a_compiled.append(len(backend_a.graphs))
        a_done.set()

    def after_first_b():
        b_out.set()
        assert a_done.wait(120), "thread A never finished its first call"

    def run_a():
        assert b_in.wait(120), "thread B never started"
        return generation(model_a, xa, ea, after_first_a), fast_a.history  # generations are per thread

    def run_b():
        return generation(model_b, xb, eb, after_first_b), fast_b.history

    results = {}
    threads = [_in_thread(run_a, results, "A"), _in_thread(run_b, results, "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    for key in ("A", "B"):
        if isinstance(results.get(key), BaseException):
            raise results[key]
    (outputs_a, history_a), (outputs_b, history_b) = results["A"], results["B"]
    assert_matches(outputs_a, expected_a)
    assert_matches(outputs_b, expected_b)
    assert history_a == history_b == (uniform(STEPS, INTERVAL),)
    # A's graphs were compiled by A's wrapper, from its first call on, full then shallow;
    # nothing of B's was compiled (by A's backend or any other).
    assert first_a_compiled == [1] and backend_a.fused() == [False, True]
    assert compiled.graphs == [] and fast_b.compile_seconds == {}
    assert set(fast_a.compile_seconds) == {"full[0]", "shallow[0]"}
