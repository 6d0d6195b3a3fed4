"""dcfx against an eager, module-level DeepCache written here from diffusers' module structure.

The reference knows nothing of dcfx's graphs. It reads the U-Net's modules:

- skips, in production order: `conv_in`, then per down block each layer (the resnet, or the
  attention after it where the block has attentions) and the downsampler: exactly what the
  diffusers down blocks push onto their residual tuple;
- up path, in execution order: per up block, resnet j (which pops the residual tuple from the
  end, so the k-th up resnet overall consumes skip num_skips-1-k), attention j, upsampler.

Full step: the plain U-Net runs; a forward pre-hook on the up resnet that consumes s_b sees
cat([h_b, s_b]) and keeps h_b (its input minus the skip's channels; the remainder is checked to
be s_b itself, which checks the pairing).

Shallow step: every module of the deep part (the down layers after s_b's producer, the mid
block, the up modules before s_b's consumer) has its forward replaced by a stub that computes
nothing and returns NaN tensors shaped like its last full-step output; the pre-hook on the
consumer swaps the NaN h_b for the cached one. So the output can only be finite if it depends
on nothing but the outer part and the cache, and the stubs guarantee the deep part never ran
(also checked by counting calls of the deep modules' submodules).

Models: UNet2DModel (DDPM-shaped, self-attention blocks, conv and resnet down/up samplers) and
UNet2DConditionModel (cross-attention blocks), with 1 and 3 layers per block; every branch.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from _tiny_unet import sample_steps
from _tolerance import as_float64, assert_float32_close, assert_float32_far, float64_copy
from torch import nn

import dcfx

# dcfx against the eager reference: float32 against the reference's float64 run
# (tests/_tolerance.py). Caching moves a run by more than FAR such bounds from the plain U-Net's
# (a stale feature from the full one's), so those comparisons can fail.
FAR = 100
T = 7
BATCH = 2


# -- models -------------------------------------------------------------------------------


def _ddpm(layers: int) -> UNet2DModel:
    if layers == 1:
        return UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=8,
        )
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=layers,
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",  # ResnetBlock2D(down=True) downsampler, called with temb
        upsample_type="resnet",
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _cond(layers: int, **overrides) -> UNet2DConditionModel:
    common = dict(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    if overrides:
        return UNet2DConditionModel(layers_per_block=layers, **common, **overrides)
    if layers == 1:
        return UNet2DConditionModel(
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            **common,
        )
    return UNet2DConditionModel(
        layers_per_block=layers,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **common,
    )


# name -> (builder, number of skips counted by hand from the config)
MODELS = {
    "ddpm_l1": (lambda: _ddpm(1), 6),  # conv_in + 3 blocks x 1 layer + 2 downsamplers
    "ddpm_l3": (lambda: _ddpm(3), 8),  # conv_in + 2 blocks x 3 layers + 1 downsampler
    "cond_l1": (lambda: _cond(1), 6),
    "cond_l3": (lambda: _cond(3), 8),
    # No mid block: the up path starts from the last down layer's output, so the deepest
    # branch's cached feature h_b and its skip s_b are the same tensor on a full step.
    "cond_nomid": (lambda: _cond(1, mid_block_type=None, block_out_channels=(16, 32),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 4),
}

CASES = [
    (name, b)
    for name, (_, n) in MODELS.items()
    for b in range(n)
]


@pytest.fixture(scope="module")
def models():
    """name -> (unet, conditioning kwargs, initial noise)."""
    out = {}
    with torch.random.fork_rng():
        for seed, (name, (build, _)) in enumerate(MODELS.items()):
            torch.manual_seed(100 + seed)
            unet = build().eval()
            cond = {}
            if isinstance(unet, UNet2DConditionModel):
                cond["encoder_hidden_states"] = torch.randn(BATCH, 5, 16)
            noise = torch.randn(BATCH, unet.config.in_channels, 8, 8)
            out[name] = (unet, cond, noise)
    return out


def fresh_scheduler(unet):
    # Stable Diffusion's DDIM settings for both families. With DDPM's own (linear betas up to
    # 0.02) x0-prediction divides by sqrt(alpha_bar) ~ 0.02 at the first steps, which blows the
    # ~1e-7 summation-order differences (dcfx's fused cut splits a 1x1 conv) up to a few 1e-6
    # within T steps.
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    sched.set_timesteps(T)
    return sched


def sample(model, unet, cond, noise):
    return sample_steps(model, fresh_scheduler(unet), noise, cond)


def interval_for(branch: int) -> int:
    return 2 + branch % 3  # N in {2, 3, 4} across the branches


# -- the eager reference ------------------------------------------------------------------


def _as_tensor(out) -> torch.Tensor:
    """The hidden state a block module returns (attentions return a 1-tuple here)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


class Layout:
    """Skips and paths of a diffusers U-Net, read from its modules."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        # down_units[i]: the modules that compute skip s_i from s_{i-1}; the last one outputs s_i.
        self.down_units: list[list[nn.Module]] = [[unet.conv_in]]
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                self.down_units.append([resnet] + ([attentions[i]] if attentions is not None else []))
            if block.downsamplers is not None:
                assert len(block.downsamplers) == 1  # the block pushes once after its downsamplers
                self.down_units.append([block.downsamplers[0]])
        # The up path in execution order, and the resnets that concatenate a skip.
        self.up_path: list[nn.Module] = []
        self.consumers: list[nn.Module] = []
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                self.up_path.append(resnet)
                self.consumers.append(resnet)
                if attentions is not None:
                    self.up_path.append(attentions[j])
            if block.upsamplers is not None:
                self.up_path.extend(block.upsamplers)
        assert len(self.consumers) == self.num_skips, "every skip is consumed by exactly one up resnet"

    @property
    def num_skips(self) -> int:
        return len(self.down_units)

    def producer(self, b: int) -> nn.Module:
        return self.down_units[b][-1]

    def consumer(self, b: int) -> nn.Module:
        # Up blocks pop their residuals from the end: the first up resnet takes the last skip.
        return self.consumers[self.num_skips - 1 - b]

    def deep(self, b: int) -> list[nn.Module]:
        down = [m for unit in self.down_units[b + 1 :] for m in unit]
        cut = next(i for i, m in enumerate(self.up_path) if m is self.consumer(b))
        mid = [self.unet.mid_block] if self.unet.mid_block is not None else []
        return down + mid + self.up_path[:cut]


def _first_input(args, kwargs):
    return args[0] if args else kwargs["input_tensor"]


def _with_first_input(args, kwargs, x):
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input_tensor": x}


class EagerDeepCache:
    """Uniform-schedule DeepCache on a plain diffusers U-Net, by hooks and stubs."""

    def __init__(self, unet: nn.Module, interval: int, branch: int):
        self.unet = unet
        self.layout = Layout(unet)
        if not 0 <= branch < self.layout.num_skips:
            raise ValueError(f"branch {branch} out of range")
        self.interval = interval
        self.producer = self.layout.producer(branch)
        self.consumer = self.layout.consumer(branch)
        self.deep = self.layout.deep(branch)
        self.begin()

    def begin(self):
        self.step = 0
        self.cache = None
        self.templates = None
        self.log = []

    def __call__(self, *args, **kwargs):
        full = self.step % self.interval == 0
        out = self.full(*args, **kwargs) if full else self.shallow(self.cache, *args, **kwargs)
        self.step += 1
        self.log.append("F" if full else "S")
        return out

    def full(self, *args, **kwargs):
        seen = {}
        templates = {}

        def on_skip(module, inputs, output):
            seen["skip"] = _as_tensor(output)

        def on_cut(module, args, kwargs):
            seen["cut_input"] = _first_input(args, kwargs)

        def on_deep(module, inputs, output):
            templates[module] = pytree.tree_map(
                lambda v: torch.full_like(v, float("nan")) if isinstance(v, torch.Tensor) else v, output
            )

        handles = [
            self.producer.register_forward_hook(on_skip),
            self.consumer.register_forward_pre_hook(on_cut, with_kwargs=True),
            *(m.register_forward_hook(on_deep) for m in self.deep),
        ]
        try:
            out = self.unet(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        skip, x = seen["skip"], seen["cut_input"]
        width = x.shape[1] - skip.shape[1]
        # The consumer's input is cat([h_b, s_b]): its tail must be the skip itself.
        assert torch.equal(x[:, width:], skip), "consumer/skip pairing is wrong"
        self.cache = x[:, :width].clone()
        self.templates = templates
        return out

    def shallow(self, cache, *args, **kwargs):
        assert self.templates is not None, "a shallow step needs a full step before it"
        seen = {}

        def on_cut(module, args, kwargs):
            x = _first_input(args, kwargs)
            width = cache.shape[1]
            seen["deep_was_stubbed"] = bool(torch.isnan(x[:, :width]).all())
            return _with_first_input(args, kwargs, torch.cat([cache, x[:, width:]], dim=1))

        def stub(template):
            return lambda *a, **k: template

        calls = []
        handles = [self.consumer.register_forward_pre_hook(on_cut, with_kwargs=True)]
        for m in self.deep:
            m.forward = stub(self.templates[m])
            for sub in m.modules():
                handles.append(sub.register_forward_pre_hook(lambda mod, inp: calls.append(mod)))
        try:
            out = self.unet(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            for m in self.deep:
                del m.forward
        # Each stubbed module is entered once (its pre-hook fires), its children never.
        stubbed = {id(m) for m in self.deep}
        assert all(id(m) in stubbed for m in calls), "a deep submodule ran on a shallow step"
        if self.deep:  # (without a mid block the deepest branch has no deep part at all)
            assert seen["deep_was_stubbed"], "the cut's deep input was not the stub's"
        assert torch.isfinite(out.sample).all(), "the shallow output depends on the deep part"
        return out


# -- tests -----------------------------------------------------------------------------------


_memo = {}


def plain_run(models, name):
    if ("plain", name) not in _memo:
        unet, cond, noise = models[name]
        _memo["plain", name] = sample(unet, unet, cond, noise)
    return _memo["plain", name]


def models64(models, name):
    """models[name] in float64: a copy of the U-Net, the same conditioning and noise."""
    if ("float64", name) not in _memo:
        unet, cond, noise = models[name]
        _memo["float64", name] = (float64_copy(unet), as_float64(cond), noise.double())
    return _memo["float64", name]


@pytest.mark.parametrize(("name", "branch"), CASES)
@pytest.mark.slow
def test_dcfx_matches_eager_reference(models, name, branch):
    unet, cond, noise = models[name]
    interval = interval_for(branch)
    ref_model = EagerDeepCache(unet, interval, branch)
    ref = sample(ref_model, unet, cond, noise)
    unet64, cond64, noise64 = models64(models, name)
    ref64 = sample(EagerDeepCache(unet64, interval, branch), unet64, cond64, noise64)
    fast = dcfx.optimize(unet, interval=interval, branch=branch)
    run = sample(fast, unet, cond, noise)

    expected = "".join("F" if i % interval == 0 else "S" for i in range(T))
    assert "".join(ref_model.log) == expected
    assert fast.history == (expected,)
    assert_float32_close(run, ref, ref64, what=f"{name} b={branch} N={interval}")
    # Caching changes the result, so the comparison above can fail.
    assert_float32_far(plain_run(models, name), ref, ref64, times=FAR, what=f"plain {name} b={branch}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_skip_count_from_modules_matches_dcfx(models, name):
    unet, cond, noise = models[name]
    layout = Layout(unet)
    assert layout.num_skips == MODELS[name][1]
    t = fresh_scheduler(unet).timesteps[0]
    with torch.no_grad():
        dcfx.optimize(unet, interval=2, branch=layout.num_skips - 1)(noise, t, **cond)
        with pytest.raises(ValueError, match="out of range"):
            dcfx.optimize(unet, interval=2, branch=layout.num_skips)(noise, t, **cond)


@pytest.mark.parametrize(("name", "branch"), CASES)
@pytest.mark.slow
def test_reference_uses_the_cache(models, name, branch):
    """The reference's shallow step, fed the feature of the same inputs' full step, equals
    the full step; fed another feature, it does not."""
    unet, cond, noise = models[name]
    sched = fresh_scheduler(unet)
    t0, t1 = sched.timesteps[0], sched.timesteps[T // 2]
    x1 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))

    def shallow_steps(unet, cond, noise, x1):
        ref = EagerDeepCache(unet, 2, branch)
        with torch.no_grad():
            ref.full(noise, t0, **cond)
            other_cache = ref.cache
            full = ref.full(x1, t1, **cond).sample
            own_cache = ref.cache
            same = ref.shallow(own_cache, x1, t1, **cond).sample
            stale = ref.shallow(other_cache, x1, t1, **cond).sample
            zeros = ref.shallow(torch.zeros_like(own_cache), x1, t1, **cond).sample
        return full, same, stale, zeros

    full, same, stale, zeros = shallow_steps(unet, cond, noise, x1)
    unet64, cond64, noise64 = models64(models, name)
    full64, _, stale64, _ = shallow_steps(unet64, cond64, noise64, x1.double())
    with torch.no_grad():
        # dcfx's shallow step with the same stale cache agrees with the reference's.
        fast = dcfx.optimize(unet, interval=2, branch=branch)
        fast.begin()
        fast(noise, t0, **cond)
        dcfx_stale = fast(x1, t1, **cond).sample
    assert fast.history == ("FS",)
    # The outer part runs the same modules on the same inputs, the cache is the full step's h_b.
    torch.testing.assert_close(same, full, rtol=0, atol=0)
    assert_float32_far(stale, full, full64, times=FAR, what="a stale feature")
    assert_float32_far(zeros, full, full64, times=FAR, what="a zero feature")
    assert_float32_close(dcfx_stale, stale, stale64, what=f"{name} b={branch} stale")
