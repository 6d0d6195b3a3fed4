"""Benchmark the fused cat + GroupNorm + SiLU cut kernel against eager and torch.compile.

    python benchmarks/bench_kernels.py [--dtype fp16] [--channels-last] [--estimate-only]

First, without a GPU too, an estimate from the kernel's own launch plan (cut_traffic.py): the
bytes one call moves through DRAM (no L2 reuse assumed) when the op computes all statistics
itself (both inputs read for statistics, then again to apply) and with cached statistics
(only skip read for statistics, the cached feature's come from the full step; or a single pass
when a group fits one program), and the share of an H100's copy bandwidth (~3.0 TB/s) that the
ideal traffic gets if the kernel moves its bytes at that speed.

Then, on CUDA, each implementation is checked against an fp32 reference and timed
(triton.testing.do_bench, median, L2 flushed between runs):
- eager:    torch.cat + F.group_norm + F.silu
- compiled: torch.compile of the eager function (default inductor, static shapes)
- triton:   the dcfx::cat_group_norm_silu op computing all statistics itself
- cached:   the same op with cached_stats (what a shallow step runs); the statistics op,
            run once per full step, is timed in its own column

Byte model for GB/s: read cached and skip once, write the output once, i.e. 2 * N * C * H * W
elements (an ideal single pass); "% copy" compares it with the device's copy bandwidth
measured in the same run (a large device-to-device Tensor.copy_, bytes = 2 x size).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`
from cut_traffic import cut_traffic  # noqa: E402

from dcfx.kernels.cat_group_norm_silu import cat_group_norm_silu_reference  # noqa: E402
from dcfx.kernels.ops import cat_group_norm_silu, group_partial_stats  # noqa: E402

NUM_GROUPS = 32  # every GroupNorm in the SD1.5 / SDXL U-Nets
EPS = 1e-5

# (name, N, C1 cached, C2 skip, H, W); N = 2: classifier-free guidance batches cond + uncond.
SHAPES = [
    # SD1.5 at 512px, latent 64x64. up_blocks[3] resnets[1] and [2] take the previous hidden
    # (320) + a 320-channel skip; resnets[2]'s skip is conv_in's output: DeepCache's branch-0
    # cut. resnets[0] takes up_blocks[2]'s upsampled output (640) + a 320 skip.
    ("SD1.5 up3.resnets[1,2] 320+320 @64", 2, 320, 320, 64, 64),
    ("SD1.5 up3.resnets[0]   640+320 @64", 2, 640, 320, 64, 64),
    # SDXL at 1024px, latent 128x128. up_blocks[2] mirrors SD1.5's last block at 128x128;
    # up_blocks[1].resnets[2] takes 640 + the 320-channel downsample skip at 64x64.
    ("SDXL  up2.resnets[1,2] 320+320 @128", 2, 320, 320, 128, 128),
    ("SDXL  up2.resnets[0]   640+320 @128", 2, 640, 320, 128, 128),
    ("SDXL  up1.resnets[2]   640+320 @64", 2, 640, 320, 64, 64),
]

H100_COPY_BYTES_PER_S = 3.0e12  # device-to-device copy, about
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# One rounding of an fp32 result (the compiled/fused paths) or two (eager): 2 ulp.
TOLERANCES = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-5, 1e-5)}


def eager_cut(cached, skip, weight, bias):
    return F.silu(F.group_norm(torch.cat([cached, skip], dim=1), NUM_GROUPS, weight, bias, EPS))


def fused_cut(cached, skip, weight, bias):
    return cat_group_norm_silu(cached, skip, weight, bias, NUM_GROUPS, EPS)


def _print_header(header):
    print(header)
    print("-" * len(header))


def print_estimate(dtype):
    """Bytes per call with statistics in the op and with cached statistics, from the launch
    plans; % copy if moved at H100 copy speed."""
    size = torch.empty((), dtype=dtype).element_size()
    print(
        f"Estimate from the kernel's launch plan, {dtype}, {NUM_GROUPS} groups (bytes the same in any "
        f"layout), no L2 reuse; "
        f"H100 copy {H100_COPY_BYTES_PER_S / 1e12:.1f} TB/s"
    )
    print("in op: the op computes every statistic itself; cached: with cached_stats (a shallow step)")
    _print_header(
        f"{'shape':38s} {'ideal MB':>8s} {'in op MB':>8s} {'cached MB':>9s} {'saved MB':>8s} "
        f"{'launches':>8s} {'in op us':>8s} {'cached us':>9s} {'% copy in op':>12s} {'% copy cached':>13s}"
    )
    for name, n, c1, c2, h, w in SHAPES:
        in_op = cut_traffic(n, c1, c2, h, w, size, NUM_GROUPS, cached_stats=False)
        cached = cut_traffic(n, c1, c2, h, w, size, NUM_GROUPS, cached_stats=True)
        bw = H100_COPY_BYTES_PER_S
        print(
            f"{name:38s} {in_op.ideal_bytes / 1e6:8.2f} {in_op.bytes / 1e6:8.2f} {cached.bytes / 1e6:9.2f} "
            f"{(in_op.bytes - cached.bytes) / 1e6:8.2f} {f'{in_op.launches}, {cached.launches}':>8s} "
            f"{in_op.seconds(bw) * 1e6:8.1f} {cached.seconds(bw) * 1e6:9.1f} "
            f"{100 * in_op.copy_fraction(bw):11.0f}% {100 * cached.copy_fraction(bw):12.0f}%"
        )
    print()


def copy_bandwidth_gbps(do_bench):
    """Device-to-device copy bandwidth: bytes = 2 x size (read + write)."""
    src = torch.empty(2**29, dtype=torch.uint8, device="cuda")  # 512 MiB, well past L2
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--channels-last", action="store_true", help="both inputs in channels_last")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time per measurement (ms)")
    parser.add_argument("--estimate-only", action="store_true", help="print the byte estimate, time nothing")
    parser.add_argument("--cuts-only", action="store_true", help="time only DeepCache's branch-0 cut shapes")
    args = parser.parse_args()

    print_estimate(DTYPES[args.dtype])
    if args.estimate_only:
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device; nothing to time.")
        return 0
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    dtype = DTYPES[args.dtype]
    rtol, atol = TOLERANCES[dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    copy_gbps = copy_bandwidth_gbps(bench)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, {NUM_GROUPS} groups; "
        f"copy bandwidth {copy_gbps:.0f} GB/s"
    )
    _print_header(
        f"{'shape':38s} {'eager us':>9s} {'compile us':>10s} {'triton us':>9s} {'cached us':>9s} "
        f"{'stats us':>8s} {'vs eager':>8s} {'vs comp':>8s} {'GB/s':>6s} {'% copy':>6s}"
    )

    for name, n, c1, c2, h, w in SHAPES:
        if args.cuts_only and not name.endswith(("320+320 @64", "320+320 @128")):
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        cached = torch.randn(n, c1, h, w, device="cuda", generator=gen).to(dtype, memory_format=memory_format)
        skip = torch.randn(n, c2, h, w, device="cuda", generator=gen).to(dtype, memory_format=memory_format)
        weight = torch.randn(c1 + c2, device="cuda", generator=gen).to(dtype)
        bias = torch.randn(c1 + c2, device="cuda", generator=gen).to(dtype)
        inputs = (cached, skip, weight, bias)

        torch.compiler.reset()
        compiled_cut = torch.compile(eager_cut, dynamic=False)
        group_size = (c1 + c2) // NUM_GROUPS
        stats = group_partial_stats(cached, group_size)

        def cached_cut(cached, skip, weight, bias):
            return cat_group_norm_silu(cached, skip, weight, bias, NUM_GROUPS, EPS, stats)

        impls = {"eager": eager_cut, "compiled": compiled_cut, "triton": fused_cut, "cached": cached_cut}

        expected = cat_group_norm_silu_reference(*(t.float() for t in inputs), NUM_GROUPS, EPS).to(dtype)
        for impl_name, fn in impls.items():
            torch.testing.assert_close(fn(*inputs), expected, rtol=rtol, atol=atol, msg=lambda m: f"{impl_name}: {m}")

        times = {impl_name: bench(lambda fn=fn: fn(*inputs)) * 1e3 for impl_name, fn in impls.items()}
        stats_us = bench(lambda: group_partial_stats(cached, group_size)) * 1e3
        model_bytes = 2 * n * (c1 + c2) * h * w * cached.element_size()
        # The shallow step's form (cached statistics) is the one that runs on most steps.
        best = times["cached"]
        gbps = model_bytes / (best * 1e-6) / 1e9
        print(
            f"{name:38s} {times['eager']:9.1f} {times['compiled']:10.1f} {times['triton']:9.1f} {best:9.1f} "
            f"{stats_us:8.1f} {times['eager'] / best:7.2f}x {times['compiled'] / best:7.2f}x "
            f"{gbps:6.0f} {100 * gbps / copy_gbps:5.0f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
