"""Bad input gets a clear error that names the valid choices, and numbers of any kind work.

- `DeepCacheConfig` fields: intervals, branches, schedules, booleans and the other options,
  each refused with the valid range; numpy integers and floats configure like Python's;
- `dcfx.optimize` and `begin`: wrong arguments, a misspelled option, a module that is not a
  U-Net (no skip connection, no `forward(sample, timestep, ...)`, a variadic forward);
- calls: numpy timesteps work like Python numbers; a call the U-Net itself rejects raises the
  U-Net's own error (no export traceback, no error-level log records); a misspelled keyword
  is named.
"""

from __future__ import annotations

import logging
import re
import traceback

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_unet import tiny_vae, unet_inputs
from diffusers import EulerDiscreteScheduler, PNDMScheduler
from torch import nn

import dcfx
from dcfx import DeepCacheConfig


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0, -3, 1.5, True, "3", None])
def test_bad_interval(interval):
    with pytest.raises(ValueError, match=r"interval must be an integer >= 1 \(1 = no caching\), got"):
        DeepCacheConfig(interval=interval)


@pytest.mark.parametrize("branch", [-1, True, 0.0, "1", None])
def test_bad_branch(branch):
    with pytest.raises(ValueError, match=r"branch must be an integer >= 0 .*dcfx\.report lists the valid range"):
        DeepCacheConfig(branch=branch)


@pytest.mark.parametrize("name", ["cosine", "Uniform", ""])
def test_unknown_schedule_name_lists_the_choices(name):
    with pytest.raises(ValueError) as info:
        DeepCacheConfig(schedule=name)
    message = str(info.value)
    assert "'uniform'" in message and "'nonuniform'" in message
    assert "sequence of full step indices" in message
    assert repr(name) in message


@pytest.mark.parametrize(
    "schedule, match",
    [
        ([], r"non-empty sequence of step indices >= 0"),
        ((0, -2), r"non-empty sequence of step indices >= 0"),
        ((0, 1.5), r"non-empty sequence of step indices >= 0"),
        ((0, True), r"non-empty sequence of step indices >= 0"),
        ((1, 4, 7), r"must include step 0 \(always full\)"),
    ],
)
def test_bad_explicit_schedule(schedule, match):
    with pytest.raises(ValueError, match=match):
        DeepCacheConfig(schedule=schedule)


def test_explicit_schedule_is_sorted_and_deduplicated():
    assert DeepCacheConfig(schedule=[7, 0, 3, 3]).schedule == (0, 3, 7)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(power=1.0), r"power must be a number > 1"),
        (dict(power="1.4"), r"power must be a number > 1"),
        (dict(center=-1), r"center must be an integer step index >= 0"),
        (dict(compile_mode="fast"), r"compile_mode must be None or one of \('default', 'reduce-overhead'"),
        (dict(compile_options=[("freezing", True)]), r"compile_options must be a mapping"),
        (dict(compile_mode="default", compile_options={"freezing": True}), r"either compile_mode or compile_options"),
    ],
)
def test_bad_other_options(options, match):
    with pytest.raises(ValueError, match=match):
        DeepCacheConfig(**options)


@pytest.mark.parametrize("field", ["compile", "fuse_cut"])
@pytest.mark.parametrize("value", ["false", "no", 1, 0, None])
def test_boolean_fields_must_be_booleans(unet, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be True or False, got {re.escape(repr(value))}"):
        DeepCacheConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        dcfx.optimize(unet, **{field: value})


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


# -- dcfx.optimize and begin ----------------------------------------------------------------------


def test_optimize_argument_errors(unet):
    with pytest.raises(TypeError, match="either a DeepCacheConfig or its fields"):
        dcfx.optimize(unet, DeepCacheConfig(), interval=2)
    with pytest.raises(TypeError, match="config must be a DeepCacheConfig"):
        dcfx.optimize(unet, {"interval": 2})
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        dcfx.optimize(lambda x, t: x, interval=2)
    with pytest.raises(ValueError, match="interval must be"):
        dcfx.optimize(unet, interval=0)


def test_unknown_option_names_the_valid_fields(unet):
    with pytest.raises(TypeError, match=r"intervall.*valid fields are interval, branch, schedule"):
        dcfx.optimize(unet, intervall=3)
    with pytest.raises(TypeError, match="not both"):
        dcfx.optimize(unet, dcfx.DeepCacheConfig(), interval=2)


def test_optimize_rewraps_a_deepcache_unet(unet):
    first = dcfx.optimize(unet, interval=2)
    second = dcfx.optimize(first, interval=4, branch=1)
    assert second.unet is unet
    assert second.deepcache_config == DeepCacheConfig(interval=4, branch=1)


@pytest.mark.parametrize("num_steps", [0, -1, True, 2.0, "3"])
def test_begin_rejects_bad_num_steps(unet, num_steps):
    with pytest.raises(ValueError, match="num_steps must be None or an integer >= 1"):
        dcfx.optimize(unet, interval=2).begin(num_steps)


# -- models that are not U-Nets -------------------------------------------------------------------


def test_optimize_refuses_a_module_that_is_not_a_unet():
    with pytest.raises(TypeError, match=r"Linear is not a U-Net: .*forward\(sample, timestep, \.\.\.\)"):
        dcfx.optimize(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"AutoencoderKL is not a U-Net"):  # forward(sample, sample_posterior=False)
        dcfx.optimize(tiny_vae())


class ConvsOnly(nn.Module):
    """(sample, timestep) -> sample; no skip connection."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, sample, timestep):
        # A channel concatenation, but neither operand is an ancestor of the other: not a skip.
        h = torch.cat([F.silu(self.a(sample)), self.b(sample)], dim=1)
        return self.out(h) + timestep.float().reshape(-1, 1, 1, 1) * 0


def test_model_without_skip_connections_is_rejected():
    model = ConvsOnly().eval()
    x = torch.randn(1, 4, 8, 8)
    fast = dcfx.optimize(model, interval=2)
    with pytest.raises(ValueError, match=r"found no skip connections .*DeepCache needs a U-Net"):
        with torch.no_grad():
            fast(x, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"found no skip connections .*DeepCache needs a U-Net"):
        dcfx.report(model, x, torch.tensor([5]))


def test_variadic_forward_is_rejected():
    class Wrapper(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return args

    with pytest.raises(TypeError, match=r"names its parameters.*\*args, \*\*kwargs"):
        dcfx.optimize(Wrapper())


class Variadic(nn.Module):
    def forward(self, sample, timestep, *args, **kwargs):
        return sample


def test_variadic_forward_message_spells_the_parameters():
    with pytest.raises(TypeError, match=r"has \*args, \*\*kwargs$"):
        dcfx.optimize(Variadic())


# -- calls --------------------------------------------------------------------------------------


def test_numpy_timesteps_work_like_python_numbers(unet):
    x, ehs = unet_inputs(batch=1)
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


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda x, ehs: (x, 500, ehs[..., :16]), id="encoder_hidden_states width"),
        pytest.param(lambda x, ehs: (x[:, :3], 500, ehs), id="channel count"),
    ],
)
def test_arguments_the_unet_rejects_raise_its_own_error(unet, make_args, log_records):
    x, ehs = unet_inputs(batch=1)
    args = make_args(x, ehs)
    with pytest.raises(RuntimeError) as plain:
        with torch.no_grad():
            unet(*args)
    fast = dcfx.optimize(unet, interval=2)
    with log_records("torch", logging.ERROR) as logged, pytest.raises(RuntimeError) as ours:
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
    x, ehs = unet_inputs(batch=1)
    fast = dcfx.optimize(unet)
    with pytest.raises(TypeError) as e:
        fast(x, 500, encoder_hidden_state=ehs)
    message = str(e.value)
    assert message.startswith(
        "UNet2DConditionModel.forward() got an unexpected keyword argument 'encoder_hidden_state'"
    ), message
    assert "did you mean 'encoder_hidden_states'?" in message and len(message) < 200
