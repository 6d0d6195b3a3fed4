"""dcfx: DeepCache for diffusion U-Nets as a compiled FX graph pass.

    pipe.unet = dcfx.optimize(pipe.unet, interval=3, branch=0)

captures the U-Net as an FX graph (capture), splits it into a full and a shallow graph at a
skip connection (passes.split), fuses the cut point into a Triton op (passes.fuse, kernels),
optionally compiles both graphs (compile) and runs one of them per step (runtime). A diffusion
transformer (Flux, SD3, PixArt, DiT, Flux 2, Qwen-Image, Wan: `passes.families`) is cut after
its first `first_blocks` and before its last `last_blocks` blocks instead (passes.split_dit):

    pipe.transformer = dcfx.optimize(pipe.transformer, interval=3, first_blocks=1, last_blocks=0)

`torch.compile(dcfx.optimize(unet), ...)` compiles both graphs with those settings;
`fast.graphs(...)` shows them; `dcfx.package`/`dcfx.load_package` ship them AOT-compiled.
"""

from .api import cuda_graphs, disable, enable, optimize
from .calibrate import calibrate
from .config import Calibration, DeepCacheConfig
from .inspection import DeepCacheGraphs
from .aot import load_package, package
from .report import Report, report
from .runtime import DeepCacheUNet
from .costs import Spent
from .policies import nonuniform_full_steps
from .version import __version__

__all__ = [
    "Calibration",
    "DeepCacheConfig",
    "DeepCacheGraphs",
    "DeepCacheUNet",
    "Report",
    "Spent",
    "calibrate",
    "cuda_graphs",
    "disable",
    "enable",
    "load_package",
    "nonuniform_full_steps",
    "optimize",
    "package",
    "report",
]
