"""The runtime: `DeepCacheUNet` and its parts.

- `steps`: the step tracker (which generation, step and stream a call falls in);
- `entries`: the entry cache (graphs per module state and input signature, export limits;
  `module_state` says what a state is) and `PackagedModel`, an AOT package's stand-in;
- `slots`: the slot cache (what a stream keeps between steps: cached features, forecast
  history, the adaptive signal's earlier values);
- `run`: one call's step (signal, decision, graph runs, what the slot keeps), which the
  eager runtime and `cuda_graphs` both take;
- `runtime`: `Runtime`, one model's calls, composing them with a policy (`dcfx.policies`);
- `unet`: `DeepCacheUNet`, the module around a `Runtime`;
- `spent`: what a generation ran, priced by `dcfx.costs`;
- `cuda_graphs`: `CapturedSteps`, a signature's steps captured in CUDA graphs.
"""

from .entries import PackagedModel
from .run import FullStep
from .runtime import Runtime
from .unet import DeepCacheUNet

__all__ = ["DeepCacheUNet", "FullStep", "PackagedModel", "Runtime"]
