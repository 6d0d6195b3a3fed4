"""AOT packages of the adaptive and forecast policies: the head, rest and tail graphs (and the
forecast's extra inputs) of the smallest U-Net with the cut packaged, loaded and run like
uncompiled dcfx with the same config."""

from __future__ import annotations

import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, small_unet
from _tolerance import assert_float32_close, float64_copy
from diffusers import DDIMScheduler

import dcfx
from dcfx.aot import load_package, package, read_manifest

pytestmark = [pytest.mark.aot, pytest.mark.inductor]

CONFIG = dcfx.DeepCacheConfig(branch=1, adaptive="cut", threshold=0.6, max_shallow=3, forecast=1)


def generation(unet, x0, e, steps=8):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x, outs = x0.clone(), []
    unet.begin(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t, encoder_hidden_states=e).sample
            outs.append(eps)
            x = sched.step(eps, t, x).prev_sample
    return outs


def test_an_adaptive_forecast_package_runs_like_uncompiled_dcfx(tmp_path):
    unet = small_unet(seed=4)
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, TOKENS, CROSS_DIM, generator=g)
    fast = dcfx.optimize(unet, CONFIG)
    path = package(fast, tmp_path / "adaptive.pt2", x0, torch.tensor(999), encoder_hidden_states=e)
    manifest = read_manifest(path)
    assert manifest["layout"]["graphs"] == ["head", "rest", "tail"] and manifest["layout"]["forecast"] == 1
    loaded = load_package(path)
    reference = dcfx.optimize(unet, CONFIG)
    expected = generation(reference, x0, e)
    reference64 = dcfx.optimize(float64_copy(unet), CONFIG)  # the uncompiled graphs in float64
    expected64 = generation(reference64, x0.double(), e.double())
    got = generation(loaded, x0, e)
    assert loaded.history == reference.history == reference64.history and "S" in loaded.history[0]
    assert_float32_close(got, expected, expected64, what="AOT package against uncompiled dcfx")
    with pytest.raises(ValueError, match="holds the graphs of a policy with head=True, forecast=1"):
        dcfx.optimize(loaded, interval=3, branch=1)
