"""Models that ship with dcfx: `digits()`, a trained SD-shaped class-conditional digit model."""

from .digits import DigitsPipeline, LabelEmbedding, digits, load_pipeline

__all__ = ["DigitsPipeline", "LabelEmbedding", "digits", "load_pipeline"]
