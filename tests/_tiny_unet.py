"""The tests' tiny random diffusers models (U-Nets, a VAE, a Stable Diffusion pipeline without
text encoder), their inputs, and DeepCache done by hand with forward hooks on the plain U-Net
(the reference dcfx is checked against), also in float64. tests/conftest.py shares the objects
that tests only read as fixtures.

Not a test module (no `test_` prefix); pytest puts tests/ on sys.path, so the test files
import it as `_tiny_unet`.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from _tolerance import as_float64, float64_copy
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

CROSS_DIM = 32
TOKENS = 7
LATENT = 8  # latent height/width used throughout

# Skip connections of TINY_UNET_CONFIG, in production order (see DEEPCACHE.md):
# s0 conv_in, s1 down_blocks[0] layer 0, s2 down_blocks[0] downsampler, s3 down_blocks[1] layer 0.
NUM_SKIPS = 4

TINY_UNET_CONFIG = dict(
    sample_size=LATENT,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)

# The fewest layers that still have skip branch 1 and the fused cut: two plain blocks, no
# attention and no mid block. Inductor compiles each kernel on its own, so a cold compile of its
# graphs costs a fraction of the tiny U-Net's.
SMALL_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "mid_block_type": None,
}


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def small_unet(seed: int = 0) -> UNet2DConditionModel:
    """SMALL_UNET_CONFIG with random weights (same inputs as `tiny_unet`)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**SMALL_UNET_CONFIG).eval()


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8,),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            sample_size=LATENT,
        ).eval()


def unet_inputs(batch: int = 2, seed: int = 0, size: int = LATENT, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A U-Net call's `sample` and `encoder_hidden_states`, drawn in that order from `seed`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(dtype)
    e = torch.randn(batch, TOKENS, CROSS_DIM, generator=g).to(dtype)
    return x, e


def prompt_embeds(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A pipeline call's `prompt_embeds` and `negative_prompt_embeds` (batch 1), drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TOKENS, CROSS_DIM, generator=g), torch.randn(1, TOKENS, CROSS_DIM, generator=g)


def tiny_pipe(unet, scheduler, vae=None, cls=None):
    """A `StableDiffusionPipeline` (or `cls`) of `unet` and `scheduler` without text encoder,
    tokenizer or safety checker (calls pass `prompt_embeds`), its progress bar off; `vae`
    defaults to a fresh `tiny_vae()`."""
    from diffusers import StableDiffusionPipeline  # imports transformers: only where needed

    pipe = (cls or StableDiffusionPipeline)(
        vae=tiny_vae() if vae is None else vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_digits_folder(folder, seed: int = 0):
    """A `DigitsPipeline` folder (what `dcfx serve` and `dcfx demo` load) with random weights:
    the digits model's shape (one channel, 16x16, ten classes, DDIM with guidance) on the tiny
    U-Net's two blocks, so that compiling it is quick. Returns `folder`."""
    from diffusers import DDIMScheduler

    from dcfx.models.digits import DigitsPipeline, LabelEmbedding, scheduler_config

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 1, "out_channels": 1, "sample_size": 16})
        labels = LabelEmbedding(dim=CROSS_DIM)
    pipe = DigitsPipeline(unet=unet.eval(), label_embedding=labels.eval(), scheduler=DDIMScheduler(**scheduler_config()))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def skip_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of s0, s1, ... as the down path of a diffusers U-Net produces them."""
    boc = unet.config.block_out_channels
    lpb = unet.config.layers_per_block
    lpb = [lpb] * len(boc) if isinstance(lpb, int) else list(lpb)
    channels = [boc[0]]
    for i, c in enumerate(boc):
        channels += [c] * lpb[i]
        if i < len(boc) - 1:
            channels.append(c)
    return channels


def skip_consumer(unet: UNet2DConditionModel, branch: int) -> nn.Module:
    """The up-path resnet whose input is cat([h_branch, s_branch], dim=1)."""
    consumers = [r for block in unet.up_blocks for r in block.resnets]  # consume s_{n-1} .. s_0
    assert len(consumers) == len(skip_channels(unet))
    return consumers[len(consumers) - 1 - branch]


class ManualDeepCache:
    """DeepCache on the plain U-Net through a forward pre-hook, as an independent reference.

    The resnet consuming skip `s_b` gets `cat([h_b, s_b], 1)`. On a full step ("F") the hook
    stores `h_b` (per batch/resolution/dtype, like dcfx's per-signature cache); on a shallow
    step ("S") it replaces `h_b` by the stored tensor. The deep path still runs on "S" steps
    but its result is discarded, so the output is what a shallow step must compute.

    `oracle(mode, *args, **kwargs)` is one U-Net call. `with oracle.replay("FSSFS"): ...` sets
    the mode per U-Net call for a whole pipeline run. The hooks exist only during these calls,
    so a dcfx capture (which traces the same U-Net) never sees them.
    """

    def __init__(self, unet: UNet2DConditionModel, branch: int):
        self.unet = unet
        self.layer = skip_consumer(unet, branch)
        self.skip = skip_channels(unet)[branch]
        self.mode = "F"
        self.saved: dict[tuple, torch.Tensor] = {}

    def _layer_hook(self, module, args):
        x = args[0]
        assert x.shape[1] == module.in_channels
        keep = x.shape[1] - self.skip
        key = (x.shape[0], *x.shape[2:], x.dtype)
        if self.mode == "F":
            self.saved[key] = x[:, :keep].clone()
            return None
        assert self.mode == "S", self.mode
        return (torch.cat([self.saved[key], x[:, keep:]], dim=1), *args[1:])

    def __call__(self, mode: str, *args, **kwargs):
        """One U-Net call as a full ("F") or shallow ("S") step."""
        self.mode = mode
        handle = self.layer.register_forward_pre_hook(self._layer_hook)
        try:
            with torch.no_grad():
                return self.unet(*args, **kwargs)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replay(self, pattern: str):
        calls = []

        def count(module, args):
            self.mode = pattern[len(calls)]
            calls.append(self.mode)

        handles = [
            self.unet.register_forward_pre_hook(count),
            self.layer.register_forward_pre_hook(self._layer_hook),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        assert "".join(calls) == pattern, "the pipeline made another number of U-Net calls"


class ReferenceDeepCache:
    """`ManualDeepCache` on the U-Net and on a float64 copy of it, called alike: each call
    gives the step's float32 reference and its float64 one (tests/_tolerance.py).

    `unets` are both U-Nets: a test that changes the U-Net's state (FreeU, an attention
    processor) changes both.
    """

    def __init__(self, unet: UNet2DConditionModel, branch: int):
        self.unets = (unet, float64_copy(unet))
        self.oracles = tuple(ManualDeepCache(u, branch) for u in self.unets)

    def __call__(self, mode: str, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The `.sample` of one U-Net call as a full ("F") or shallow ("S") step, float32 and float64."""
        out32 = self.oracles[0](mode, *args, **kwargs).sample
        out64 = self.oracles[1](mode, *as_float64(args), **as_float64(kwargs)).sample
        return out32, out64


@contextlib.contextmanager
def float32_noise():
    """diffusers' random draws (`randn_tensor`) made in float32 and then cast, in every module
    that imported it: a float64 pipeline run starts from the float32 run's noise (a float64
    draw from the same generator gives other numbers)."""
    from diffusers.utils import torch_utils

    draw = torch_utils.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None, layout=None):
        return draw(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)

    users = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("randn_tensor") is draw]
    for module in users:
        module.randn_tensor = float32_draw
    try:
        yield
    finally:
        for module in users:
            module.randn_tensor = draw


def uniform(num_steps: int, interval: int) -> str:
    return "".join("F" if i % interval == 0 else "S" for i in range(num_steps))


def pattern_of(full_steps, num_steps: int) -> str:
    full = set(full_steps)
    return "".join("F" if i in full else "S" for i in range(num_steps))


def sample_steps(unet, scheduler, latents, cond) -> list[torch.Tensor]:
    """Plain sampling loop returning every step's latents; `scheduler` fresh, timesteps set.

    The timestep goes in positionally, as a tensor: DeepCache's reference helper needs that.
    """
    lat = latents * scheduler.init_noise_sigma
    steps = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(lat, t), t, **cond).sample
            lat = scheduler.step(eps, t, lat).prev_sample
            steps.append(lat.clone())
    return steps


class Recorder:
    """A dynamo backend that runs each graph as traced and records what it was given."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def fused(self) -> list[bool]:
        """Per recorded graph: whether it holds dcfx's fused cut op."""
        from dcfx.passes.fuse import FUSED_OP

        return [any(n.target is FUSED_OP for n in gm.graph.nodes) for gm in self.graphs]
