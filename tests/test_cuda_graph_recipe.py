"""The CUDA-graph recipe of docs/cuda-graphs.md, executed as written under PNDM and Euler: its
final latents against the same sampling loop run eagerly by dcfx (float32 and float64,
tests/_tolerance.py). On a CPU `dcfx.cuda_graphs` runs the same steps uncaptured, each graph's
outputs static as in a replay; on a GPU with real CUDA graphs. Three faults put back into the
recipe show that the comparison catches them. (The recipe against the reference package on a
GPU: test_cuda_reference.py.)
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from _tiny_unet import tiny_unet, unet_inputs
from _tolerance import assert_float32_close, float64_copy
from diffusers import EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

import dcfx

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


RECIPE_PAGE = ROOT / "docs" / "cuda-graphs.md"


def recipe_block() -> str:
    """The first Python code block of the CUDA-graph page: the recipe."""
    return RECIPE_PAGE.read_text().split("```python\n", 1)[1].split("\n```", 1)[0]


RECIPE_SCHEDULERS = {
    "pndm": lambda: PNDMScheduler(steps_offset=1, skip_prk_steps=True),  # keeps past model outputs
    "euler": lambda: EulerDiscreteScheduler(steps_offset=1),  # fractional timesteps, scaled input
}


@functools.lru_cache(maxsize=None)
def recipe_unet(device: str) -> UNet2DConditionModel:
    # One U-Net per device: dcfx shares its captures between the tests' wrappers.
    return tiny_unet(seed=0).to(device)


def run_recipe(recipe: str, kind: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recipe's final latents, and the same sampling loop run eagerly by dcfx (float32 and
    float64). On a CPU `dcfx.cuda_graphs` runs the same steps uncaptured, each graph's outputs
    static as in a replay (so a missing `.clone()` shows)."""
    unet = recipe_unet(device)
    latents, text = (t.to(device) for t in unet_inputs(batch=2, seed=3))
    scheduler = RECIPE_SCHEDULERS[kind]()
    scheduler.set_timesteps(8, device=device)
    namespace = dict(unet=unet, scheduler=scheduler, latents=latents, text=text, torch=torch, dcfx=dcfx)
    exec(compile(recipe, str(RECIPE_PAGE.relative_to(ROOT)), "exec"), namespace)

    # What the replayed graphs must compute: the same schedule, run without graphs, in float32
    # and in float64 (tests/_tolerance.py).
    expected = [eager_loop(u, kind, device, latents, text) for u in (unet, recipe_unet64(device))]
    return namespace["latents"], *expected


@functools.lru_cache(maxsize=None)
def recipe_unet64(device: str) -> UNet2DConditionModel:
    return float64_copy(recipe_unet(device))


def eager_loop(unet, kind: str, device: str, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The recipe's sampling loop on dcfx run eagerly, in `unet`'s dtype."""
    reference = dcfx.optimize(unet, interval=3, branch=0)
    scheduler = RECIPE_SCHEDULERS[kind]()
    scheduler.set_timesteps(8, device=device)
    expected = latents.to(unet.dtype) * scheduler.init_noise_sigma
    text = text.to(unet.dtype)
    reference.begin(len(scheduler.timesteps))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = reference(scheduler.scale_model_input(expected, t), t, text).sample
            expected = scheduler.step(eps, t, expected).prev_sample
    assert "S" in reference.history[-1]
    return expected


def assert_recipe_matches(recipe: str, kind: str, device: str) -> None:
    got, expected, expected64 = run_recipe(recipe, kind, device)
    assert_float32_close(got, expected, expected64, what="the recipe's latents (too far away from the eager loop's)")


@pytest.mark.parametrize("kind", sorted(RECIPE_SCHEDULERS))
@pytest.mark.slow
def test_docs_cuda_graph_recipe_as_written(kind):
    assert_recipe_matches(recipe_block(), kind, "cpu")


# Three faults, each put back into the recipe: the test above must catch them.
FAULTS = {
    "no clone": ("pndm", lambda r: r.replace(".clone()", "")),
    "integer timestep buffer": ("euler", lambda r: r.replace("dtype=timesteps.dtype", "dtype=torch.int64")),
    "no scale_model_input": ("euler", lambda r: re.sub(r"scheduler\.scale_model_input\((\w+), \w+\)", r"\1", r)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.slow
def test_docs_cuda_graph_recipe_faults_are_caught(fault):
    kind, inject = FAULTS[fault]
    recipe = recipe_block()
    broken = inject(recipe)
    assert broken != recipe, f"the recipe no longer contains what {fault!r} removes"
    with pytest.raises(AssertionError, match="away from the eager loop"):
        assert_recipe_matches(broken, kind, "cpu")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", sorted(RECIPE_SCHEDULERS))
def test_docs_cuda_graph_recipe_as_written_cuda(kind):
    assert_recipe_matches(recipe_block(), kind, "cuda")
