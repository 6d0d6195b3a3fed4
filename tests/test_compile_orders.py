"""torch.compile in every order a user writes it: each compiles exactly the full and the shallow
graph, whole, with the user's backend, mode and options, and never recompiles.

A recording dynamo backend stands in for inductor here (what reaches the backend is what
dynamo compiled; inductor itself is exercised in test_compile.py), and the U-Net is the
smallest with the cut (dynamo traces every op), so these tests are fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from _tiny_unet import Recorder as _Recorder
from _tiny_unet import small_unet
from diffusers import UNet2DModel

import dcfx
from dcfx import compile as dcfx_compile
from dcfx.passes.fuse import FUSED_OP


class Recorder(_Recorder):
    def fused(self) -> list[bool]:
        return [any(n.target is FUSED_OP for n in gm.graph.nodes) for gm in self.graphs]


@pytest.fixture(scope="module")
def unet():
    return small_unet(seed=0)


def inputs(batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 7, 32, generator=g)


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
def test_every_order_compiles_the_two_graphs_whole_and_equals_uncompiled(unet, order):
    x, e = inputs()
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
    x, e = inputs()
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

    x, e = inputs()
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
    from _tiny_unet import tiny_vae
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=1), text_encoder=None, tokenizer=None, unet=small_unet(seed=0),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    plain_unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

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
