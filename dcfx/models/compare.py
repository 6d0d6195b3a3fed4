"""Sampling one model several ways from the same noise, and scoring the results.

A `Setting` is plain DDIM or dcfx at some (interval, branch, schedule) and step count; a
`Sampler` runs settings on one model with fixed noise and labels and counts their FLOPs (from
`dcfx.report`, priced by `dcfx.costs`); `matched_ddim` finds the plain DDIM step count of about the same FLOPs as a
dcfx setting (the paper's "fewer steps" baseline); `evaluate` scores samples against the
plain ones (and, with the digits judge, for class accuracy and Fréchet distance). Shared by
`dcfx demo` and `benchmarks/fidelity_study.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import disable, enable, optimize
from ..config import DeepCacheConfig
from ..costs import GraphCost
from ..report import report
from ..policies import StepSchedule
from .calls import example_call
from .quality import psnr

# name -> (display name, diffusers scheduler class name, overrides of the model's DDIM config)
SCHEDULERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "ddim-noclip": ("DDIM no-clip", "DDIMScheduler", {"clip_sample": False}),
    "dpm++2m": ("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPC", "UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config: Any, spacing: str) -> Any:
    """A new scheduler `name` (a key of SCHEDULERS) from a model's scheduler config, with that
    timestep spacing."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; one of {', '.join(SCHEDULERS)}")
    _, cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, timestep_spacing=spacing, **overrides)


@dataclass(frozen=True)
class Setting:
    """One way of sampling: the plain sampler (`config=None`) or dcfx with `config`, at `steps`."""

    name: str
    steps: int
    config: DeepCacheConfig | None = None

    @staticmethod
    def plain(steps: int, sampler: str = "DDIM") -> "Setting":
        return Setting(f"{sampler} {steps}", steps)

    @staticmethod
    def of(steps: int, config: DeepCacheConfig) -> "Setting":
        """dcfx with `config`, named after its policy ("dcfx N=3 b=0", "dcfx cut 0.15 b=0"; a
        config with other fields off their defaults by its setting, "dcfx 3:0:warmup=3")."""
        c = config
        forecast = f" forecast {c.forecast}" if c.forecast else ""
        if "=" in c.setting:
            name = f"dcfx {c.setting}"
        elif c.adaptive is not None:
            name = f"dcfx {c.adaptive}{f' {c.threshold:g}' if c.threshold is not None else ''}{forecast} b={c.branch}"
        else:
            name = f"dcfx N={c.interval} b={c.branch}{' nonuniform' if c.schedule == 'nonuniform' else ''}{forecast}"
        return Setting(name, steps, config)


@dataclass
class Result:
    setting: Setting
    images: torch.Tensor  # (n, C, H, W), float32 in [0, 1] for the digits model
    seconds: float
    flops_ratio: float  # FLOPs of this setting / FLOPs of the plain reference setting
    history: str = ""


class Sampler:
    """Runs settings on one model with fixed noise and labels; knows its FLOP costs.

    `model` is a `DigitsPipeline` (sampled through the pipeline with `dcfx.enable`, as a user
    would) or a bare U-Net (sampled by a DDIM loop with `DeepCacheUNet.begin`).
    """

    def __init__(self, model: Any, num_samples: int, seed: int, guidance_scale: float, scheduler: Any = None):
        self.model = model
        self.is_pipeline = hasattr(model, "unet")
        self.unet: nn.Module = model.unet if self.is_pipeline else model
        cfg = self.unet.config
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num_samples) % 10
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.latents = torch.randn(num_samples, cfg.in_channels, size, size, generator=gen)
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        # A bare conditional U-Net gets a fixed random stand-in for a text embedding.
        width = getattr(cfg, "cross_attention_dim", None)
        self.cond = None if self.is_pipeline or width is None else torch.randn(num_samples, 77, width, generator=gen)
        self._costs: dict[tuple[int, bool], GraphCost] = {}

    def run(self, setting: Setting) -> Result:
        """Samples `setting` once (timed), after an untimed warm-up that builds its graphs."""
        if setting.config is not None:
            self._generate(setting, warmup=True)  # capture/split outside the timing
        start = time.perf_counter()
        images, history = self._generate(setting)
        seconds = time.perf_counter() - start
        return Result(setting, images, seconds, float("nan"), history)

    def flops(self, setting: Setting, history: str | None = None) -> float:
        """FLOPs of one generation of `setting` (for one sample's CFG batch), from dcfx.report;
        an adaptive setting's from the steps it ran (`history`, 'F'/'S' per step)."""
        config = setting.config or DeepCacheConfig(interval=1)  # plain: every step full
        if history is not None:
            num_full = history.count("F")
        elif config.adaptive is not None:
            raise ValueError(f"{setting.name}: an adaptive setting's FLOPs are known once it ran (pass its history)")
        else:
            num_full = len(StepSchedule(config).full_steps(setting.steps))
        return self._cost(config).generation_flops(num_full, setting.steps - num_full)

    def _cost(self, config: DeepCacheConfig) -> GraphCost:
        """The graphs' cost per call at `config`'s branch. Counted once per branch: each count
        captures the U-Net, which takes longer than sampling a small model."""
        key = (config.branch, config.fuse_cut)
        if key not in self._costs:
            args, kwargs = self._example_call()
            counted = DeepCacheConfig(branch=config.branch, fuse_cut=config.fuse_cut)
            r = report(self.unet, *args, config=counted, num_steps=1, branches=[config.branch], **kwargs).branches[0]
            self._costs[key] = r.cost
        return self._costs[key]

    def _example_call(self) -> tuple[tuple, dict]:
        # One call's shapes are all FLOPs depend on: a CFG batch of one sample for the
        # pipeline (label tokens), one unguided row for a bare U-Net (the sampler's).
        if self.is_pipeline:
            tokens = self.model.label_embedding.config.tokens_per_class
            call = example_call(self.unet, 1, guided=self.guidance_scale > 1, tokens=tokens)
        else:
            call = example_call(self.unet, 1, guided=False)
        return call.args, call.kwargs

    def _generate(self, setting: Setting, warmup: bool = False) -> tuple[torch.Tensor, str]:
        steps = 2 if warmup else setting.steps
        if self.is_pipeline:
            pipe = self.model
            fast = enable(pipe, setting.config) if setting.config is not None else None
            try:
                out = pipe(self.labels, num_inference_steps=steps, guidance_scale=self.guidance_scale,
                           latents=self.latents.clone(), output_type="pt")
            finally:
                if fast is not None:
                    disable(pipe)
            return out.images, (fast.history[-1] if fast is not None else "F" * steps)
        return self._generate_unet(setting, steps)

    @torch.no_grad()
    def _generate_unet(self, setting: Setting, steps: int) -> tuple[torch.Tensor, str]:
        from diffusers import DDIMScheduler

        scheduler = self.scheduler or DDIMScheduler()
        unet = optimize(self.unet, setting.config) if setting.config is not None else self.unet
        scheduler.set_timesteps(steps)
        if setting.config is not None:
            unet.begin(steps)
        x = self.latents.clone() * scheduler.init_noise_sigma
        kwargs = {} if self.cond is None else {"encoder_hidden_states": self.cond}
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t, **kwargs).sample
            x = scheduler.step(eps, t, x).prev_sample
        return x, (unet.history[-1] if setting.config is not None else "F" * steps)


def matched_ddim(sampler: Sampler, setting: Setting, reference_steps: int, history: str | None = None,
                 name: str = "DDIM") -> Setting:
    """The plain sampler (DDIM unless `name` says otherwise) with the step count whose FLOPs
    are closest to `setting`'s (an adaptive setting's as it ran: `history`)."""
    full = sampler.flops(Setting.plain(1))
    steps = max(1, round(sampler.flops(setting, history) / full))
    return Setting.plain(min(steps, reference_steps), name)


def evaluate(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, judge: Any | None) -> dict[str, float]:
    """accuracy and Fréchet distance (with a judge), PSNR and max error against `reference`."""
    out: dict[str, float] = {}
    if judge is not None:
        out["accuracy"] = judge.accuracy(images, labels)
        out["frechet"] = judge.frechet_to_test(images)
    lo, hi = float(reference.min()), float(reference.max())
    scale = (hi - lo) or 1.0  # digits live in [0, 1]; a bare U-Net's samples in their own range
    out["psnr"] = psnr((images - lo) / scale, (reference - lo) / scale)
    out["max_err"] = float((images - reference).abs().max())
    return out
