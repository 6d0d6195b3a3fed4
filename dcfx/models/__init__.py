"""Models that ship with dcfx, and loading others: `digits()`, a trained SD-shaped
class-conditional digit model; `flux_digits()`, a trained Flux-shaped one (flow matching);
`random_unet(size)`, random-weight SD-shaped U-Nets for examples and benchmarks; `load(model)`,
the one loader of the models dcfx's commands take (the digits model, a local diffusers pipeline
or U-Net folder); `example_call(unet)`, one call of a diffusers U-Net with random conditioning."""

from .calls import ExampleCall, example_call
from .digits import DigitsPipeline, LabelEmbedding, digits, load_pipeline
from .flux_digits import FluxDigitsPipeline, flux_digits, load_flux_digits
from .loader import describe, load, model_kind
from .sd_shaped import random_unet

__all__ = [
    "DigitsPipeline", "ExampleCall", "FluxDigitsPipeline", "LabelEmbedding", "describe", "digits", "example_call",
    "flux_digits", "load", "load_flux_digits", "load_pipeline", "model_kind", "random_unet",
]
