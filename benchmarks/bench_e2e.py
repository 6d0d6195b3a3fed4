"""End-to-end DeepCache speed: one generation per variant, interleaved, median of repeats.

    python benchmarks/bench_e2e.py [--size small] [--resolution 16] [--steps 20] [--interval 3]
                                   [--branches 0 2 5] [--variants eager dcfx ...]
                                   [--device cuda --dtype fp16] [--repeats 3] [--out table.txt]

Random-weight U-Net (no download): `tiny`, `small`, `sd15` (SD1.5's architecture) or `sdxl`
(SDXL's), `sdxl-tiny` for rehearsals; DDIM, classifier-free-guidance batch 2. Variants:

- eager:           the diffusers U-Net
- reference:       the same U-Net under DeepCache 0.1.1's `DeepCacheSDHelper` (re-enabled
                   before each generation)
- compile:         `torch.compile(unet)` (inductor, default mode)
- cudagraph:       the U-Net captured in one CUDA graph, replayed per step
- dcfx:            `dcfx.optimize(unet)`, graphs uncompiled
- dcfx-compile:    `compile=True` (inductor, default mode)
- dcfx-cudagraph:  the README's recipe: a captured full and a captured shallow step
- dcfx-reduce-overhead: `compile=True, compile_mode="reduce-overhead"`
- dcfx-compile-unfused: `compile=True, fuse_cut=False` (inductor sees the plain cut)

Each repeat runs one generation of every variant in turn (a shared machine distorts single
measurements; interleaving spreads that over all variants), after one untimed generation per
variant (capture, compile: its time is the "1st s" column). Speedups divide medians of the
same run. The FLOP bound is what `dcfx.report` predicts for the schedule.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import dcfx
from dcfx.example import build_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = (
    "eager", "reference", "compile", "cudagraph",
    "dcfx", "dcfx-compile", "dcfx-cudagraph", "dcfx-reduce-overhead", "dcfx-compile-unfused",
)
BRANCHED = set(VARIANTS) - {"eager", "compile", "cudagraph"}
CUDA_ONLY = {"cudagraph", "dcfx-cudagraph", "dcfx-reduce-overhead"}


def build_model(size: str) -> UNet2DConditionModel:
    """A random-weight U-Net; `sdxl` has SDXL's architecture (2.6B parameters)."""
    if size not in ("sdxl", "sdxl-tiny"):
        return build_unet(size)
    full = size == "sdxl"
    widths = (320, 640, 1280) if full else (32, 64, 64)
    return UNet2DConditionModel(
        sample_size=128 if full else 16,
        block_out_channels=widths,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10) if full else (1, 1, 2),
        attention_head_dim=(5, 10, 20) if full else (4, 8, 8),
        cross_attention_dim=2048 if full else 32,
        norm_num_groups=32 if full else 8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256 if full else 8,
        projection_class_embeddings_input_dim=(2048 + 6 * 256) if full else (32 + 6 * 8),
    ).eval()


def conditioning(unet, batch: int, device, dtype) -> dict:
    """Random text conditioning (and SDXL's added text/time embeddings) for `batch` rows."""
    cfg = unet.config
    cond = {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
        }
    return cond


class _Replayed:
    """CUDA graphs captured once and replayed per step, as the README's recipe does.

    For a DeepCacheUNet: one full-step and one shallow-step graph, replayed by the schedule;
    for the plain U-Net: one graph.
    """

    def __init__(self, unet, x, t, cond):
        self.unet, self.x, self.t, self.cond = unet, x.clone(), t.clone(), cond
        self.cached = isinstance(unet, dcfx.DeepCacheUNet)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: capture the graphs, allocate the cache
            for _ in range(2):
                self._calls(2 if self.cached else 1)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outs = [], []
        if self.cached:
            unet.begin()
        for _ in range(2 if self.cached else 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outs.append(unet(self.x, self.t, **cond).sample)
            self.graphs.append(graph)
        self.step, self.num_steps = 0, None

    def _calls(self, n):
        if self.cached:
            self.unet.begin()
        for _ in range(n):
            self.unet(self.x, self.t, **self.cond)

    def begin(self, num_steps):
        self.step, self.num_steps = 0, num_steps

    def __call__(self, x, t, **cond):
        self.x.copy_(x)
        self.t.copy_(t)
        k = 0 if not self.cached or self.unet.is_full_step(self.step, self.num_steps) else 1
        self.step += 1
        self.graphs[k].replay()
        return types.SimpleNamespace(sample=self.outs[k])


class _Reference:
    """The U-Net under DeepCacheSDHelper, enabled for one generation at a time."""

    def __init__(self, unet, scheduler, interval, branch):
        from DeepCache.extension.deepcache import DeepCacheSDHelper

        self.unet = unet
        self.helper = DeepCacheSDHelper(types.SimpleNamespace(unet=unet, scheduler=scheduler))
        self.helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def generation(self, run):
        self.helper.enable()
        try:
            return run(self.unet)
        finally:
            self.helper.disable()
            # disable() leaves the original forwards as instance attributes: drop them so the
            # other variants see the U-Net as built.
            for module in self.unet.modules():
                module.__dict__.pop("forward", None)


def _generation(unet, scheduler, latents, cond, steps, device):
    """Seconds for one CFG generation of `steps` DDIM steps."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(unet, "begin"):
        unet.begin(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        eps = unet(torch.cat([latents] * 2), t, **cond).sample
        eps_uncond, eps_text = eps.chunk(2)
        latents = scheduler.step(eps_uncond + 7.5 * (eps_text - eps_uncond), t, latents).prev_sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _make(variant, unet, args, branch, scheduler, x, t0, cond):
    """The callable U-Net of a variant (or a _Reference)."""
    if variant == "eager":
        return unet
    if variant == "reference":
        return _Reference(unet, scheduler, args.interval, branch)
    if variant in ("compile", "cudagraph"):
        plain = torch.compile(unet, fullgraph=True, dynamic=False) if variant == "compile" else unet
        return _Replayed(plain, x, t0, cond) if variant == "cudagraph" else plain
    config = dict(interval=args.interval, branch=branch)
    if variant in ("dcfx-compile", "dcfx-reduce-overhead", "dcfx-compile-unfused"):
        config.update(compile=True, compile_mode="reduce-overhead" if variant == "dcfx-reduce-overhead" else None)
    if variant == "dcfx-compile-unfused":
        config.update(fuse_cut=False)
    fast = dcfx.optimize(unet, **config)
    if variant == "dcfx-cudagraph":
        return _Replayed(fast, x, t0, cond)
    return fast


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "sd15", "sdxl", "sdxl-tiny"), default="small")
    p.add_argument("--resolution", type=int, default=16, help="latent height and width (image size / 8)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branches", type=int, nargs="+", default=[0, 2, 5])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager", "dcfx"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    bad = [v for v in args.variants if v in CUDA_ONLY and device.type != "cuda"]
    if bad:
        p.error(f"{', '.join(bad)} need --device cuda")
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: SDXL's 2.6B parameters init slowly on a CPU
        unet = build_model(args.size)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    latents = torch.randn(1, 4, args.resolution, args.resolution, device=device, dtype=dtype)
    cond = conditioning(unet, 2, device, dtype)
    x, t0 = torch.cat([latents] * 2), torch.tensor(999, device=device)
    scheduler = DDIMScheduler()

    rows = []
    with torch.no_grad():
        bounds = {
            b: dcfx.report(
                unet, x, 999, num_steps=args.steps, branches=[b],
                config=dcfx.DeepCacheConfig(interval=args.interval), **cond,
            ).branches[0].speedup_bound
            for b in args.branches
        }
        keys = [(v, b) for v in args.variants for b in (args.branches if v in BRANCHED else [None])]
        runners, first, times = {}, {}, {k: [] for k in keys}

        def run(key):
            runner = runners[key]
            if isinstance(runner, _Reference):
                return runner.generation(lambda u: _generation(u, scheduler, latents, cond, args.steps, device))
            return _generation(runner, scheduler, latents, cond, args.steps, device)

        for key in keys:
            start = time.perf_counter()
            runners[key] = _make(key[0], unet, args, key[1], scheduler, x, t0, cond)
            run(key)  # capture, compile, warm up
            first[key] = time.perf_counter() - start
        for _ in range(args.repeats):
            for key in keys:
                times[key].append(run(key))
        for key in keys:
            runner = runners[key]
            inner = runner.unet if isinstance(runner, _Replayed) else runner
            seconds = inner.compile_seconds if isinstance(inner, dcfx.DeepCacheUNet) else {}
            compiled = sum(seconds.values()) if seconds else None
            rows.append((key, statistics.median(times[key]), min(times[key]), max(times[key]), first[key], compiled))

    base = {v: s for (v, b), s, *_ in rows if b is None}
    lines = [
        f"{args.size} U-Net, latents {args.resolution}x{args.resolution} ({8 * args.resolution}px), {args.dtype} on "
        f"{device.type}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, CFG batch 2, {args.steps} DDIM steps, interval {args.interval}, "
        f"median of {args.repeats}",
        f"{'variant':<21} {'branch':>6} {'s/gen':>8} {'min-max':>15} {'vs eager':>8} {'vs compile':>10} "
        f"{'FLOP bound':>10} {'1st s':>7} {'compile s':>9}",
    ]
    for (variant, branch), median, lo, hi, first_s, compiled in rows:
        vs_eager = f"{base['eager'] / median:.2f}x" if "eager" in base else "-"
        vs_compile = f"{base['compile'] / median:.2f}x" if "compile" in base else "-"
        bound = f"{bounds[branch]:.2f}x" if branch is not None and variant != "reference" else "-"
        lines.append(
            f"{variant:<21} {'-' if branch is None else branch:>6} {median:8.3f} {f'{lo:.3f}-{hi:.3f}':>15} "
            f"{vs_eager:>8} {vs_compile:>10} {bound:>10} {first_s:7.1f} "
            f"{'-' if compiled is None else f'{compiled:.1f}':>9}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
