"""The runtime: `DeepCacheUNet` and its parts.

- `steps`: the step tracker (which generation, step and stream a call falls in);
- `graphs`: the graph cache (graphs per module state and input signature, export limits);
- `slots`: the slot cache (what a stream keeps between steps: cached features, forecast
  history, the adaptive signal's references);
- `spent`: what a generation ran, priced by `dcfx.costs`;
- `unet`: `DeepCacheUNet`, composing them with a policy (`dcfx.policies`).
"""

from .unet import DeepCacheUNet

__all__ = ["DeepCacheUNet"]
