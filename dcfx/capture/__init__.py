"""Capture: a U-Net plus one call's arguments -> an FX graph over the call's tensors.

- `binding`: the call normalised (`CallBinder.bind` -> `Call`), its signature key and the
  tensors that identify its stream;
- `timesteps`: a timestep given as a number, as the tensor the model class makes of it;
- `lora`: a LoRA scale and other per-step floats as graph inputs;
- `export`: `capture(unet, call)`, torch.export of the U-Net as a function of the call's
  tensor leaves, and `module_path` (which U-Net module a graph node comes from).

Capture touches the user's module only to export it, and never modifies it.
"""

from .binding import Call, CallBinder
from .export import UNET_PREFIX, Capture, FloatsNotLiftable, capture, module_path

__all__ = [
    "UNET_PREFIX",
    "Call",
    "CallBinder",
    "Capture",
    "FloatsNotLiftable",
    "capture",
    "module_path",
]
