"""Does a transformer's cut pay for a fused op? The add of the cached residual, then the next
block's LayerNorm and modulation, eager against inductor, with a DRAM traffic model.

On a shallow step the cached residual is added to the stream the first Fn blocks made; the
next block (a tail block's `norm1`, or `norm_out` when Bn = 0) normalises the sum and
modulates it (`norm(x) * (1 + scale) + shift`); the sum also continues as the block's
residual stream. A fused op would read the stream and the residual once and write the sum
and the modulated output once: 4 tensor passes. Eager runs four kernels (add, layer norm,
multiply, add): 9 passes. This script measures both on this machine and counts the kernels
inductor generates for the pattern (read from its output code in a fresh cache folder): if
inductor already emits one kernel for it, a custom op gains nothing under compile.

    python benchmarks/dit_cut_fusion.py                 # Flux's width: 4096 + 512 tokens, 3072
    python benchmarks/dit_cut_fusion.py --tokens 64 --hidden 96 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

EAGER_PASSES = 9  # add: 2 reads + 1 write; layer norm: 1 + 1; multiply: 1 + 1; add: 1 + 1
FUSED_PASSES = 4  # stream and residual read once; sum and output written once


def cut(stream: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """The shallow step at the cut: the residual added, then the next block's modulated norm."""
    total = stream + residual
    normed = F.layer_norm(total, total.shape[-1:], eps=1e-6)
    return total, normed * (1 + scale[:, None]) + shift[:, None]


def traffic_bytes(tokens: int, hidden: int, element_size: int, passes: int, batch: int = 1) -> int:
    """DRAM bytes of `passes` full passes over one (batch, tokens, hidden) tensor."""
    return passes * batch * tokens * hidden * element_size


def seconds(fn, args, repeats: int) -> float:
    fn(*args)  # warm-up (and the compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inductor_kernels(cache: Path) -> list[str]:
    """The kernel names in inductor's output code under `cache` (its cache folder)."""
    names: set[str] = set()
    for path in cache.rglob("*.py"):
        names.update(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\s*=", path.read_text(errors="ignore")))
    return sorted(names)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096 + 512, help="image + text tokens (Flux 1024x1024: 4608)")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="DRAM bytes/s for the model (H100 SXM)")
    args = p.parse_args(argv)
    # Inductor reads its cache folder when first imported: a fresh one, so that only this
    # script's kernels are found there.
    cache = Path(tempfile.mkdtemp(prefix="dcfx-cut-fusion-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)

    g = torch.Generator().manual_seed(0)
    stream, residual = (torch.randn(1, args.tokens, args.hidden, generator=g) for _ in range(2))
    scale, shift = (0.1 * torch.randn(1, args.hidden, generator=g) for _ in range(2))
    inputs = (stream, residual, scale, shift)
    with torch.no_grad():
        eager = seconds(cut, inputs, args.repeats)
        compiled_fn = torch.compile(cut, fullgraph=True, dynamic=False)
        compiled = seconds(compiled_fn, inputs, args.repeats)
        for a, b in zip(cut(*inputs), compiled_fn(*inputs)):
            torch.testing.assert_close(a, b)  # the same function
    kernels = inductor_kernels(cache)

    print(f"cut pattern (add, layer norm, modulation) on ({args.tokens}, {args.hidden}) float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| path | tensor passes | DRAM model at bf16 | measured here (fp32) |")
    print("|---|---:|---:|---:|")
    for name, passes, measured in (("eager (4 kernels)", EAGER_PASSES, eager),
                                   (f"inductor ({len(kernels)} kernel{'s' * (len(kernels) != 1)})",
                                    FUSED_PASSES if len(kernels) == 1 else None, compiled)):
        model = (f"{traffic_bytes(args.tokens, args.hidden, 2, passes) / args.bandwidth * 1e6:.1f} us"
                 if passes else "-")
        print(f"| {name} | {passes or '-'} | {model} | {measured * 1e3:.2f} ms |")
    print(f"\ninductor's kernels: {', '.join(kernels) or 'none found'}")
    if len(kernels) == 1:
        print("inductor emits one kernel for the cut's add, norm and modulation: a custom op would move the "
              "same bytes under compile, and save eager runs only the difference above.")
    else:
        sys.exit(f"inductor split the pattern into {len(kernels)} kernels: a fused op may pay here")


if __name__ == "__main__":
    main()
