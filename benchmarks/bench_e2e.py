"""End-to-end DeepCache speed: one generation, plain U-Net vs dcfx, per branch.

    python benchmarks/bench_e2e.py [--size small] [--steps 20] [--interval 3] [--branches 0 2 5]
                                   [--compile [--compile-mode reduce-overhead]] [--cuda-graph]
                                   [--device cuda --dtype fp16]

Random-weight SD-shaped U-Net (no download), DDIM, CFG batch 2. Plain and dcfx generations
alternate and each variant keeps its best of --repeats, so the printed ratios come from one
interleaved run (the only speed comparison that means anything on a shared machine). The
FLOP bound column is what `dcfx.report` predicts for the same schedule.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.__main__ import build_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Replayed:
    """CUDA graphs captured once and replayed per step, as the README's recipe does.

    For a DeepCacheUNet: one full-step and one shallow-step graph, replayed by the schedule;
    for the plain U-Net: one graph.
    """

    def __init__(self, unet, x, t, ehs):
        self.unet, self.x, self.t, self.ehs = unet, x.clone(), t.clone(), ehs
        self.cached = isinstance(unet, dcfx.DeepCacheUNet)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: capture/compile the graphs, allocate the cache
            for _ in range(2):
                self._calls(2 if self.cached else 1)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outs = [], []
        if self.cached:
            unet.begin()
        for _ in range(2 if self.cached else 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outs.append(unet(self.x, self.t, encoder_hidden_states=self.ehs).sample)
            self.graphs.append(graph)
        self.step, self.num_steps = 0, None

    def _calls(self, n):
        if self.cached:
            self.unet.begin()
        for _ in range(n):
            self.unet(self.x, self.t, encoder_hidden_states=self.ehs)

    def begin(self, num_steps):
        self.step, self.num_steps = 0, num_steps

    def __call__(self, x, t, encoder_hidden_states):
        self.x.copy_(x)
        self.t.copy_(t)
        k = 0 if not self.cached or self.unet.is_full_step(self.step, self.num_steps) else 1
        self.step += 1
        self.graphs[k].replay()
        return types.SimpleNamespace(sample=self.outs[k])


def _generation(unet, scheduler, latents, ehs, steps, device):
    scheduler.set_timesteps(steps, device=device)
    if hasattr(unet, "begin"):
        unet.begin(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ehs).sample
        eps_uncond, eps_text = eps.chunk(2)
        latents = scheduler.step(eps_uncond + 7.5 * (eps_text - eps_uncond), t, latents).prev_sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "sd15"), default="small")
    p.add_argument("--resolution", type=int, default=16, help="latent height and width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branches", type=int, nargs="+", default=[0, 2, 5])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile dcfx's graphs and the plain U-Net")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--cuda-graph", action="store_true", help="capture both sides in CUDA graphs and replay")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args()

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = build_unet(args.size).to(device, dtype)
    latents = torch.randn(1, 4, args.resolution, args.resolution, device=device, dtype=dtype)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    scheduler = DDIMScheduler()
    if args.cuda_graph and device.type != "cuda":
        p.error("--cuda-graph needs --device cuda")
    mode = args.compile_mode
    plain = torch.compile(unet, fullgraph=True, dynamic=False, mode=mode) if args.compile else unet
    t0 = torch.tensor(999, device=device)
    if args.cuda_graph:
        with torch.no_grad():
            plain = _Replayed(plain, torch.cat([latents] * 2), t0, ehs)

    rows = []
    with torch.no_grad():
        for branch in args.branches:
            fast = dcfx.optimize(
                unet, interval=args.interval, branch=branch, compile=args.compile, compile_mode=mode
            )
            start = time.perf_counter()
            _generation(fast, scheduler, latents, ehs, args.steps, device)  # capture (+ compile)
            first = time.perf_counter() - start
            timed = _Replayed(fast, torch.cat([latents] * 2), t0, ehs) if args.cuda_graph else fast
            _generation(plain, scheduler, latents, ehs, args.steps, device)
            plain_s = fast_s = float("inf")
            for _ in range(args.repeats):
                plain_s = min(plain_s, _generation(plain, scheduler, latents, ehs, args.steps, device))
                fast_s = min(fast_s, _generation(timed, scheduler, latents, ehs, args.steps, device))
            bound = dcfx.report(
                fast, torch.cat([latents] * 2), 999, ehs, num_steps=args.steps, branches=[branch]
            ).branches[0].speedup_bound
            compiled = fast.compile_seconds
            rows.append((branch, plain_s, fast_s, plain_s / fast_s, bound, first,
                         compiled.get("full[0]", 0.0), compiled.get("shallow[0]", 0.0)))

    print(
        f"{args.size} U-Net, latents {args.resolution}x{args.resolution}, {args.dtype} on {device.type}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{args.steps} DDIM steps, interval {args.interval}, compile={args.compile}"
        f"{' mode=' + mode if mode else ''}, cuda_graph={args.cuda_graph}"
    )
    print(
        f"{'branch':>6}  {'plain s':>8}  {'dcfx s':>8}  {'speedup':>7}  {'FLOP bound':>10}  {'1st gen s':>9}"
        f"  {'compile full s':>14}  {'compile shallow s':>17}"
    )
    for branch, plain_s, fast_s, speedup, bound, first, c_full, c_shallow in rows:
        print(
            f"{branch:>6}  {plain_s:>8.3f}  {fast_s:>8.3f}  {speedup:>6.2f}x  {bound:>9.2f}x  {first:>9.2f}"
            f"  {c_full:>14.1f}  {c_shallow:>17.1f}"
        )


if __name__ == "__main__":
    main()
