"""benchmarks/cut_traffic.py: the fused cut op's DRAM bytes and launches, from its launch plan."""

from _benchmarks import script

cut_traffic = script("cut_traffic").cut_traffic


def test_traffic_model_sd15_cut():
    # SD1.5 branch-0 cut, fp16: one input half is 2 * 320 * 64 * 64 * 2 bytes.
    half = 2 * 320 * 64 * 64 * 2
    in_op = cut_traffic(2, 320, 320, 64, 64, 2, cached_stats=False)
    cached = cut_traffic(2, 320, 320, 64, 64, 2, cached_stats=True)
    assert in_op.ideal_bytes == cached.ideal_bytes == 4 * half
    # Statistics of both inputs, then apply: both read twice, the output written once; the
    # statistics pieces are a few KiB.
    assert 0 < in_op.bytes - 6 * half < 64 * 1024 and in_op.launches == 2
    # With the cached feature's statistics, the statistics launch reads only skip.
    assert 0 < cached.bytes - 5 * half < 64 * 1024 and cached.launches == 2
    assert cut_traffic(2, 40, 40, 8, 8, 2).launches == 1  # fits one program per group: single pass
