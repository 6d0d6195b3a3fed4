"""torch.compile as users write it, and which compile setting a call of a dcfx U-Net uses.

- every order of writing torch.compile compiles exactly the full and the shallow graph, whole,
  with the user's backend, mode and options, and never recompiles;
- disabled compiling compiles nothing: `unet.compile(disable=True)` before `optimize`,
  `fast.compile(disable=True)`, `torch.compiler.disable` around the U-Net or around dcfx's
  module, and `TORCHDYNAMO_DISABLE=1`, each also over `compile=True` in the config;
- the setting is the calling thread's own: two threads, one under a torch.compile wrapper and
  one not, each get their own route, and the results each gets alone.

A recording dynamo backend stands in for inductor here (what reaches the backend is what
dynamo compiled; inductor itself is exercised in test_compile.py; the `compiled` fixture sends
what dcfx would compile with inductor to a recorder), and the U-Net is the smallest with the
cut (dynamo traces every op), so these tests are fast. Results are checked against uncompiled
dcfx, or against `ReferenceDeepCache` (DeepCache done by hand on the plain U-Net, in float32
and float64).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch._dynamo
from _tiny_unet import ReferenceDeepCache, Recorder, prompt_embeds, small_unet, tiny_pipe, uniform, unet_inputs
from _tolerance import assert_float32_close
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DModel

import dcfx
from dcfx import compile as dcfx_compile


@pytest.fixture(scope="module")
def unet():
    return small_unet(seed=0)


# -- every order, mode and option -------------------------------------------------------------


def generation(model, x, e, steps=6):
    model.begin(steps) if hasattr(model, "begin") else None
    return [model(x, 999 - 150 * i, encoder_hidden_states=e).sample for i in range(steps)]


def compiled_with(order: str, unet, backend):
    """The DeepCacheUNet (or the module around it) for one way of writing torch.compile."""
    if order == "torch.compile(optimize(unet))":
        return torch.compile(dcfx.optimize(unet, interval=3, branch=1), backend=backend, fullgraph=True)
    if order == "optimize(unet).compile()":
        fast = dcfx.optimize(unet, interval=3, branch=1)
        fast.compile(backend=backend, fullgraph=True)
        return fast
    if order == "unet.compile(); optimize(unet)":
        compiled = small_unet(seed=0)  # its own copy: compiling marks the module
        compiled.compile(backend=backend)
        return dcfx.optimize(compiled, interval=3, branch=1)
    if order == "optimize(torch.compile(unet))":
        return dcfx.optimize(torch.compile(unet, backend=backend), interval=3, branch=1)
    raise AssertionError(order)


ORDERS = (
    "torch.compile(optimize(unet))",
    "optimize(unet).compile()",
    "unet.compile(); optimize(unet)",
    "optimize(torch.compile(unet))",
)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.slow
def test_every_order_compiles_the_two_graphs_whole_and_equals_uncompiled(unet, order):
    x, e = unet_inputs()
    expected = generation(dcfx.optimize(unet, interval=3, branch=1), x, e)
    backend = Recorder()
    model = compiled_with(order, unet, backend)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = generation(model, x, e)
        second = generation(model, x, e)  # a second generation compiles nothing
    # The recorder runs the graphs dynamo traced: the same aten ops in the same order.
    for out in (first, second):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Exactly the full graph, then the shallow one (with the fused cut), each in one piece.
    assert len(backend.graphs) == 2
    assert backend.fused() == [False, True]
    fast = getattr(model, "_orig_mod", model)
    assert fast.history[-2:] == ("FSSFSS", "FSSFSS")


@torch._dynamo.config.patch(recompile_limit=2)  # 8 by default: three signatures show it as nine do
@pytest.mark.slow
def test_more_signatures_than_the_recompile_limit_never_reach_it():
    # dynamo's limit is recompile_limit compiles per code object; each signature's graphs have
    # their own code, so one signature more than the limit compiles without a recompile.
    signatures = torch._dynamo.config.recompile_limit + 1
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    backend = Recorder()
    model = torch.compile(dcfx.optimize(unet, interval=2, branch=0), backend=backend)
    plain = dcfx.optimize(unet, interval=2, branch=0)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. dynamo's "hit config.recompile_limit"
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            for batch in range(1, signatures + 1):
                x = torch.randn(batch, 3, 8, 8)
                expected = [plain(x, t).sample for t in (900, 800)]
                for _ in range(2):  # the second generation of a signature compiles nothing
                    out = [model(x, t).sample for t in (900, 800)]
                    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(backend.graphs) == 2 * signatures  # a full and a shallow graph per signature, once


def test_mode_and_options_reach_the_graphs(unet, monkeypatch):
    # Which settings each graph is compiled with (inductor itself is not run here).
    used = []

    def record(self, graph):
        used.append((graph.meta.get("dcfx_cached_outputs") is not None, self))
        return graph

    monkeypatch.setattr(dcfx_compile.Compiler, "compile", record)
    x, e = unet_inputs()
    model = torch.compile(dcfx.optimize(unet, interval=2), options={"epilogue_fusion": False})
    generation(model, x, e, steps=2)
    assert [c.backend.config for _, c in used] == [{"epilogue_fusion": False}] * 2

    used.clear()
    fast = dcfx.optimize(unet, interval=2)
    fast.compile(mode="max-autotune-no-cudagraphs")
    assert fast.deepcache_config.compile and fast.deepcache_config.compile_mode == "max-autotune-no-cudagraphs"
    generation(fast, x, e, steps=2)
    assert [c.mode for _, c in used] == ["max-autotune-no-cudagraphs"] * 2

    used.clear()
    compiled = torch.compile(unet, mode="max-autotune-no-cudagraphs")
    generation(dcfx.optimize(compiled, interval=2), x, e, steps=2)
    assert all(c.backend.config.get("max_autotune") for _, c in used) and len(used) == 2

    used.clear()
    fast = dcfx.optimize(unet, interval=2, compile=True)
    fast.compile(disable=True)  # as torch.compile(disable=True): nothing compiles
    generation(fast, x, e, steps=2)
    assert used == [] and not fast.deepcache_config.compile


def test_bad_compile_arguments_fail_at_the_call(unet):
    fast = dcfx.optimize(unet)
    with pytest.raises(TypeError, match="torch.compile's keyword arguments"):
        fast.compile(modes="max-autotune")
    with pytest.raises(Exception, match="not_an_inductor_option"):
        fast.compile(options={"not_an_inductor_option": 1})
    assert fast.deepcache_config.compile is False  # unchanged


def test_a_graph_that_fails_to_compile_warns_and_runs_uncompiled(unet):
    def broken(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    x, e = unet_inputs()
    expected = generation(dcfx.optimize(unet, interval=2), x, e, steps=2)
    fast = dcfx.optimize(unet, interval=2)
    fast.compile(backend=broken)
    with pytest.warns(RuntimeWarning, match=r"failed on the \w+ graph.*cannot compile anything.*runs uncompiled") as caught:
        out = generation(fast, x, e, steps=2)
        generation(fast, x, e, steps=2)  # warned once per graph, not per call
    assert [str(w.message).split(" failed on the ")[1].split()[0] for w in caught] == ["full", "shallow"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


class Pipe:
    """Any object with a U-Net and a scheduler is a pipeline to `dcfx.enable`."""


class Scheduler:
    timesteps = None


def test_disable_gives_back_the_compiled_unet(unet):
    compiled = torch.compile(unet, backend=Recorder())
    pipe = Pipe()
    pipe.unet, pipe.scheduler = compiled, Scheduler()
    fast = dcfx.enable(pipe, interval=2)
    assert fast.unet is unet and fast.given is compiled
    assert dcfx.disable(pipe) is compiled and pipe.unet is compiled
    # Re-optimizing a DeepCacheUNet keeps what it was given.
    assert dcfx.optimize(fast, interval=3).given is compiled


def test_compiling_an_enabled_pipeline_keeps_it_planned_and_saveable(tmp_path, monkeypatch):
    # diffusers' documented pattern, `pipe.unet = torch.compile(pipe.unet)`, after enable.
    pipe = tiny_pipe(small_unet(seed=0), DDIMScheduler())
    plain_unet = pipe.unet
    prompt, negative = prompt_embeds(seed=0)

    def generate():
        with torch.no_grad():
            return pipe(
                prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=5,
                height=8, width=8, output_type="latent", generator=torch.Generator().manual_seed(0),
            ).images

    fast = dcfx.enable(pipe, interval=2)
    expected = generate()
    backend = Recorder()
    pipe.unet = torch.compile(pipe.unet, backend=backend)
    reads = []
    monkeypatch.setattr(dcfx.runtime.steps, "host_timestep", lambda t: reads.append(t) or 0.0)  # planned: never called
    torch.testing.assert_close(generate(), expected, rtol=0, atol=0)
    assert not reads and fast.history[-1] == "FSFSF" and len(backend.graphs) == 2
    pipe.save_pretrained(tmp_path)  # the plain U-Net is what gets saved
    assert StableDiffusionPipeline.load_config(tmp_path)["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert dcfx.disable(pipe) is plain_unet


# -- disabled means nothing is compiled ------------------------------------------------------------


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


def stepped_generation(model, x, e, after_first=lambda: None) -> list[torch.Tensor]:
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


def test_the_stand_in_backend_sees_every_compile(unet, compiled):
    # The control for the tests below: with compiling on, both graphs reach the recorder.
    x, e = unet_inputs()
    fast = dcfx.optimize(unet, interval=INTERVAL, compile=True)
    assert_matches(stepped_generation(fast, x, e), expected(unet, x, e))
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
    x, e = unet_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "could not read the torch.compile settings"
        model = build(way, unet)
        outputs = stepped_generation(model, x, e)
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
    x, e = unet_inputs()
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
        outputs = stepped_generation(model, x, e)
    assert_matches(outputs, expected(unet, x, e))
    assert compiled.graphs == [] and own.graphs == []
    assert dcfx_module(model).compile_seconds == {}


# -- each thread its own route ------------------------------------------------------------------


def _in_thread(target, results, key):
    def run():
        try:
            results[key] = target()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            results[key] = e

    return threading.Thread(target=run, name=key)


@pytest.mark.parametrize("other", ["torch.compiler.disable wrapper", "no wrapper"])
@pytest.mark.slow
def test_two_threads_each_take_their_own_compile_route(compiled, other):
    unet_a, unet_b = small_unet(seed=0), small_unet(seed=1)
    (xa, ea), (xb, eb) = unet_inputs(seed=0), unet_inputs(seed=1)
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
        return stepped_generation(model_a, xa, ea, after_first_a), fast_a.history  # generations are per thread

    def run_b():
        return stepped_generation(model_b, xb, eb, after_first_b), fast_b.history

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
