"""Models that ship with dcfx: `digits()`, a trained SD-shaped class-conditional digit model,
and `random_unet(size)`, random-weight SD-shaped U-Nets for examples and benchmarks."""

from .digits import DigitsPipeline, LabelEmbedding, digits, load_pipeline
from .sd_shaped import random_unet

__all__ = ["DigitsPipeline", "LabelEmbedding", "digits", "load_pipeline", "random_unet"]
