"""Traffic model of the fused cut op: the DRAM bytes and kernel launches of one
`cat_group_norm_silu` call, from the kernels' own launch plan (`dcfx.kernels.plan`).

No L2 reuse is assumed: every tile a kernel loads comes from DRAM. Used by
benchmarks/bench_kernels.py to estimate, without a GPU, what computing the cached feature's
statistics once per full step saves a shallow step.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcfx.kernels.group_partial_stats import STATS_FIELDS
from dcfx.kernels.plan import contiguous_strides, cut_plan

H100_PROGRAMS = 132 * 8  # an H100's SMs x the programs per SM the planner aims for


@dataclass(frozen=True)
class Traffic:
    """Bytes one call moves through DRAM and its kernel launches."""

    read_bytes: int
    write_bytes: int
    launches: int
    ideal_bytes: int  # read both inputs once, write the output once

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def seconds(self, bandwidth: float, launch_seconds: float = 0.0) -> float:
        return self.bytes / bandwidth + self.launches * launch_seconds

    def copy_fraction(self, bandwidth: float, launch_seconds: float = 0.0) -> float:
        """Fraction of copy bandwidth at which the ideal bytes move, if the kernel moves its own
        bytes at `bandwidth` (the README's % copy metric)."""
        return self.ideal_bytes / bandwidth / self.seconds(bandwidth, launch_seconds)


def cut_traffic(n: int, c1: int, c2: int, h: int, w: int, element_size: int, num_groups: int = 32,
                cached_stats: bool = True, target_programs: int = H100_PROGRAMS) -> Traffic:
    """Traffic of one call on NCHW inputs: with `cached_stats` (a shallow step's call: the
    statistics launch reads only skip) or without (the kernel computes the statistics of both
    inputs, so the two-pass path reads everything twice)."""
    channels, hw = c1 + c2, h * w
    inputs = n * channels * hw * element_size
    ideal = 2 * inputs
    plan = cut_plan(
        n, c1, c2, h, w, contiguous_strides(n, c1, h, w), contiguous_strides(n, c2, h, w), element_size,
        num_groups, cached_stats, target_programs, False,
    )
    if plan.single_pass:
        return Traffic(inputs, inputs, 1, ideal)
    stats_channels = channels - plan.c_lo
    pieces = n * (num_groups - plan.g_first) * STATS_FIELDS * plan.hw_splits * 4
    cached_stats_bytes = n * plan.g1 * STATS_FIELDS * 4 if cached_stats else 0
    read = n * stats_channels * hw * element_size + inputs + pieces + cached_stats_bytes
    return Traffic(read, inputs + pieces, 2, ideal)
