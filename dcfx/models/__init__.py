"""Models that ship with dcfx, and loading others: `digits()`, a trained SD-shaped
class-conditional digit model; `random_unet(size)`, random-weight SD-shaped U-Nets for examples
and benchmarks; `load(model)`, the one loader of the models dcfx's commands take (the digits
model, a local diffusers pipeline or U-Net folder); `example_call(unet)`, one call of a
diffusers U-Net with random conditioning."""

from .calls import ExampleCall, example_call
from .digits import DigitsPipeline, LabelEmbedding, digits, load_pipeline
from .loader import describe, load, model_kind
from .sd_shaped import random_unet

__all__ = [
    "DigitsPipeline", "ExampleCall", "LabelEmbedding", "describe", "digits", "example_call", "load", "load_pipeline",
    "model_kind", "random_unet",
]
