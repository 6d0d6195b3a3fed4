"""Issue 7, the API side: saving a pipeline with dcfx enabled, strict and numpy-friendly
arguments, clear errors, the reference's non-uniform schedule, and the CUDA-graph recipe of
docs/cuda-graphs.md.

- save: `pipe.save_pretrained` with `dcfx.enable` saves the plain U-Net, `from_pretrained`
  loads it, and `disable` leaves the pipeline's config as it was;
- arguments: booleans must be bools; numpy integers (config fields, explicit schedules,
  timesteps from `scheduler.timesteps.numpy()`) and numpy float timesteps work like Python
  numbers;
- errors: a module that is not a U-Net is refused by `optimize`; a call the U-Net itself
  rejects raises the U-Net's own error (no export traceback, no error-level log records); a
  misspelled keyword is named;
- schedule: `nonuniform_full_steps` equals the reference's `sample_from_quad_center` over the
  issue's grid; an explicit schedule is honoured with interval=1;
- docs: the CUDA-graph recipe, executed as written, under PNDM and Euler (on CPU with a
  stand-in for CUDA graphs that replays the recorded call into the captured output tensors;
  on a GPU with real ones);
- history: the current generation and the 16 before it, in order.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import math
import re
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

import dcfx
from dcfx import DeepCacheConfig, DeepCacheUNet
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, tiny_unet, tiny_vae
from _tolerance import assert_float32_close, float64_copy

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


def inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, LATENT, LATENT, generator=g), torch.randn(batch, TOKENS, CROSS_DIM, generator=g)


# -- item 5: save_pretrained and the pipeline's config ----------------------------------------


def tiny_pipe(unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=1),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def records(name: str, level: int):
    """Log records of `name` and its children at `level` or above (whatever propagation says)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = seen.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_save_pretrained_with_dcfx_enabled_saves_and_loads_the_plain_unet(unet, tmp_path):
    pipe = tiny_pipe(unet)
    before = dict(pipe.config)
    fast = dcfx.enable(pipe, interval=2, branch=0)
    assert dict(pipe.config) == before  # still records diffusers' UNet2DConditionModel

    with records("diffusers", logging.WARNING) as warned:
        pipe.save_pretrained(tmp_path)
    assert not [r for r in warned if "unet" in r.getMessage()]  # nothing printed the module
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "unet" / "config.json").exists()
    assert pipe.unet is fast and pipe.config["unet"] == before["unet"]  # still enabled

    loaded = StableDiffusionPipeline.from_pretrained(
        tmp_path, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    assert type(loaded.unet) is UNet2DConditionModel
    for (name, a), (_, b) in zip(loaded.unet.state_dict().items(), unet.state_dict().items()):
        assert torch.equal(a, b), name

    dcfx.disable(pipe)
    assert pipe.unet is unet and "save_pretrained" not in vars(pipe)


def test_disable_leaves_the_pipeline_config_as_before_enable(unet):
    pipe = tiny_pipe(unet)
    before = dict(pipe.config)
    dcfx.enable(pipe, interval=3)
    dcfx.enable(pipe, interval=2)  # re-enabling replaces the first
    dcfx.disable(pipe)
    assert dict(pipe.config) == before and pipe.unet is unet

    # Assigned by hand, diffusers records DeepCacheUNet; disable (and enable) repair it.
    pipe.unet = dcfx.optimize(pipe.unet)
    assert pipe.config["unet"][1] == "DeepCacheUNet"
    dcfx.disable(pipe)
    assert dict(pipe.config) == before and pipe.unet is unet
    pipe.unet = dcfx.optimize(pipe.unet)
    dcfx.enable(pipe)
    assert dict(pipe.config) == before
    dcfx.disable(pipe)


# -- item 7: strict booleans, numpy numbers -------------------------------------------------


@pytest.mark.parametrize("field", ["compile", "fuse_cut"])
@pytest.mark.parametrize("value", ["false", "no", 1, 0, None])
def test_boolean_fields_must_be_booleans(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be True or False, got {re.escape(repr(value))}"):
        DeepCacheConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        dcfx.optimize(tiny_unet(), **{field: value})


def test_numpy_numbers_configure_like_python_ints():
    c = DeepCacheConfig(interval=np.int64(3), branch=np.int32(1), center=np.uint8(10), power=np.float64(1.5))
    assert c == DeepCacheConfig(interval=3, branch=1, center=10, power=1.5)
    assert [type(v) for v in (c.interval, c.branch, c.center, c.power)] == [int, int, int, float]
    explicit = DeepCacheConfig(schedule=np.array([6, 0, 3]))
    assert explicit.schedule == (0, 3, 6) and all(type(s) is int for s in explicit.schedule)
    assert explicit == DeepCacheConfig(schedule=[0, 3, 6])
    assert dcfx.nonuniform_full_steps(np.int64(50), np.int64(5), np.int64(15)) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    for bad in (dict(interval=3.0), dict(interval=np.float64(3)), dict(branch=True), dict(schedule=[0, 2.0]),
                dict(schedule=np.array([0.0, 3.0])), dict(schedule=np.array([True, False]))):
        with pytest.raises(ValueError, match="integer"):
            DeepCacheConfig(**bad)


def test_numpy_timesteps_work_like_python_numbers(unet):
    x, ehs = inputs()
    schedulers = {"integer": PNDMScheduler(steps_offset=1, skip_prk_steps=True), "float": EulerDiscreteScheduler(steps_offset=1)}
    for kind, scheduler in schedulers.items():
        scheduler.set_timesteps(5)
        numpy_steps = list(scheduler.timesteps.numpy())  # np.int64 / np.float32 scalars
        assert isinstance(numpy_steps[0], np.integer if kind == "integer" else np.floating)
        python_steps = [t.item() for t in numpy_steps]
        outs = {}
        for name, steps in (("numpy", numpy_steps), ("python", python_steps)):
            fast = dcfx.optimize(unet, interval=2, branch=1)
            with torch.no_grad():
                outs[name] = [fast(x, t, ehs).sample for t in steps]
            outs[name + " history"] = fast.history
        assert outs["numpy history"] == outs["python history"] and "S" in outs["numpy history"][0]
        for a, b in zip(outs["numpy"], outs["python"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():  # step 0 is full: the plain U-Net's output for the Python number, its own ops
            torch.testing.assert_close(outs["numpy"][0], unet(x, python_steps[0], ehs).sample, rtol=0, atol=0)


# -- item 8: clear errors -------------------------------------------------------------------


def test_optimize_refuses_a_module_that_is_not_a_unet():
    with pytest.raises(TypeError, match=r"Linear is not a U-Net: .*forward\(sample, timestep, \.\.\.\)"):
        dcfx.optimize(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"AutoencoderKL is not a U-Net"):  # forward(sample, sample_posterior=False)
        dcfx.optimize(tiny_vae())


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda x, ehs: (x, 500, ehs[..., :16]), id="encoder_hidden_states width"),
        pytest.param(lambda x, ehs: (x[:, :3], 500, ehs), id="channel count"),
    ],
)
def test_arguments_the_unet_rejects_raise_its_own_error(unet, make_args):
    x, ehs = inputs()
    args = make_args(x, ehs)
    with pytest.raises(RuntimeError) as plain:
        with torch.no_grad():
            unet(*args)
    fast = dcfx.optimize(unet, interval=2)
    with records("torch", logging.ERROR) as logged, pytest.raises(RuntimeError) as ours:
        with torch.no_grad():
            fast(*args)
    assert str(ours.value) == str(plain.value)
    assert ours.value.__suppress_context__  # not chained to torch.export's failure
    frames = len(traceback.extract_tb(ours.value.__traceback__))
    # dcfx's own frames (runtime, capture, the dynamo-disabled __call__), not export's dozens.
    assert frames <= len(traceback.extract_tb(plain.value.__traceback__)) + 12, frames
    assert not logged, [r.getMessage() for r in logged]
    fast.begin()
    with torch.no_grad():  # the wrapper still works for a valid call: a full step, the U-Net's own ops
        torch.testing.assert_close(fast(x, 500, ehs).sample, unet(x, 500, ehs).sample, rtol=0, atol=0)


def test_a_misspelled_keyword_is_named(unet):
    x, ehs = inputs()
    fast = dcfx.optimize(unet)
    with pytest.raises(TypeError) as e:
        fast(x, 500, encoder_hidden_state=ehs)
    message = str(e.value)
    assert message.startswith(
        "UNet2DConditionModel.forward() got an unexpected keyword argument 'encoder_hidden_state'"
    ), message
    assert "did you mean 'encoder_hidden_states'?" in message and len(message) < 200


class Variadic(nn.Module):
    def forward(self, sample, timestep, *args, **kwargs):
        return sample


def test_variadic_forward_message_spells_the_parameters():
    with pytest.raises(TypeError, match=r"has \*args, \*\*kwargs$"):
        dcfx.optimize(Variadic())


# -- item 9: the reference's non-uniform schedule, explicit schedules with interval 1 --------


def reference_sample_from_quad_center():
    """The reference's own function, from the installed DeepCache package's source (its module
    cannot be imported with today's diffusers: it imports names diffusers has removed)."""
    import importlib.util

    spec = importlib.util.find_spec("DeepCache")
    path = Path(spec.origin).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center"]
    namespace = {"np": np}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["sample_from_quad_center"]


def test_nonuniform_schedule_equals_the_reference_over_the_issue_grid():
    reference = reference_sample_from_quad_center()
    # The issue's grid: 97 step counts x 7 intervals x 31 centers at the SD power = 21,049.
    grid = [(t, n, c, 1.4) for t in range(2, 99) for n in range(2, 9) for c in range(31)]
    assert len(grid) == 21_049
    differ = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's np.int32(complex array)
        for t, n, c, p in grid:
            # The reference's caller: ceil(T / N) full steps.
            try:
                expected = tuple(int(i) for i in reference(t, math.ceil(t / n), c, p)[0])
            except ValueError:
                expected = None
            try:
                got = dcfx.nonuniform_full_steps(t, n, c, p)
            except ValueError:
                got = None
            if got != expected:
                differ.append(((t, n, c, p), got, expected))
    assert not differ, f"{len(differ)} configurations differ, e.g. {differ[:3]}"


def test_explicit_schedule_is_honoured_with_interval_one(unet):
    fast = dcfx.optimize(unet, interval=1, schedule=[0, 4], branch=1)
    assert fast.full_steps(6) == (0, 4) and not fast.is_full_step(1, 6)
    x, ehs = inputs()
    fast.begin(6)
    with torch.no_grad():
        for t in (900, 800, 700, 600, 500, 400):
            fast(x, t, ehs)
    assert fast.history == ("FSSSFS",)


# -- the CUDA-graph recipe in the docs -------------------------------------------------------


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
    latents, text = (t.to(device) for t in inputs(batch=2, seed=3))
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
def test_docs_cuda_graph_recipe_as_written(kind):
    assert_recipe_matches(recipe_block(), kind, "cpu")


# Three faults, each put back into the recipe: the test above must catch them.
FAULTS = {
    "no clone": ("pndm", lambda r: r.replace(".clone()", "")),
    "integer timestep buffer": ("euler", lambda r: r.replace("dtype=timesteps.dtype", "dtype=torch.int64")),
    "no scale_model_input": ("euler", lambda r: re.sub(r"scheduler\.scale_model_input\((\w+), \w+\)", r"\1", r)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
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


def test_history_keeps_the_current_generation_and_the_16_before_it(unet):
    # Generations of 1, 2 and 3 steps in turn (interval 2: "F", "FS", "FSF"), so that the
    # entries kept show which generations they are, and in which order.
    fast = dcfx.optimize(unet, interval=2)
    x, ehs = inputs()
    patterns = ("F", "FS", "FSF")
    with torch.no_grad():
        for g in range(20):
            fast.begin()
            for _ in range(g % 3 + 1):
                fast(x, 900, ehs)
            assert fast.history[-1] == patterns[g % 3]
    assert fast.history == tuple(patterns[g % 3] for g in range(3, 20))
