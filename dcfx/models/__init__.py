"""Models that ship with dcfx: `digits()`, a trained SD-shaped class-conditional digit model,
`flux_digits()`, a trained Flux-shaped one (flow matching), and `random_unet(size)`,
random-weight SD-shaped U-Nets for examples and benchmarks."""

from .digits import DigitsPipeline, LabelEmbedding, digits, load_pipeline
from .flux_digits import FluxDigitsPipeline, flux_digits, load_flux_digits
from .sd_shaped import random_unet

__all__ = [
    "DigitsPipeline", "FluxDigitsPipeline", "LabelEmbedding", "digits", "flux_digits", "load_flux_digits",
    "load_pipeline", "random_unet",
]
