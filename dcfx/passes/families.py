"""Which split rule a model gets: the one registry of model families.

A U-Net (anything that is not a transformer) is cut at a skip connection (`split.py`,
`DeepCacheConfig.branch`). A diffusion transformer whose class is in `TRANSFORMERS` is cut
into its first Fn and last Bn blocks around a cached middle (`split_dit.py`,
`DeepCacheConfig.first_blocks` / `last_blocks`). Another transformer class is refused, naming
the supported ones: the rule is checked exact on each listed class (`tests/test_transformers.py`),
not on classes it was never run on.

`resolve(config, model)` is where the family decides: it checks the config's cut against the
model and fills in the transformer defaults, so everything downstream reads a complete cut
from the config and never looks at the model's class again.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import DeepCacheConfig

# Supported transformer classes -> the ModuleLists holding their blocks, in execution order.
TRANSFORMERS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "DiTTransformer2DModel": ("transformer_blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
}
# A transformer's cut when the config names none: First-Block-Cache's (Fn = 1, Bn = 0).
DEFAULT_FIRST_BLOCKS, DEFAULT_LAST_BLOCKS = 1, 0


def transformer_lists(model: nn.Module) -> tuple[str, ...] | None:
    """The block lists of a supported transformer (its class or a base class is registered),
    None for a U-Net; ValueError for a transformer of another class."""
    for cls in type(model).__mro__:
        if cls.__name__ in TRANSFORMERS:
            return TRANSFORMERS[cls.__name__]
    name = type(model).__name__
    if "Transformer" in name or type(model).__module__.startswith("diffusers.models.transformers"):
        raise ValueError(
            f"dcfx does not support {name}: its transformer split rule is checked on "
            f"{', '.join(sorted(TRANSFORMERS))}"
        )
    return None


def num_blocks(model: nn.Module) -> int | None:
    """A supported transformer's block count (None for a U-Net)."""
    lists = transformer_lists(model)
    return None if lists is None else sum(len(getattr(model, name)) for name in lists)


def resolve(config: DeepCacheConfig, model: nn.Module) -> DeepCacheConfig:
    """`config` with its cut checked against `model`'s family; a transformer's unset
    first_blocks/last_blocks filled in (1 and 0). Raises ValueError naming the fields."""
    n = num_blocks(model)
    name = type(model).__name__
    if n is None:
        if config.blocks_given:
            raise ValueError(
                f"{name} is cut at a skip connection: set branch, not first_blocks/last_blocks "
                f"(got first_blocks={config.first_blocks}, last_blocks={config.last_blocks})"
            )
        return config
    if config.branch:
        raise ValueError(
            f"{name} is a transformer: set first_blocks/last_blocks (Fn, Bn), not branch (got branch={config.branch})"
        )
    fn = DEFAULT_FIRST_BLOCKS if config.first_blocks is None else config.first_blocks
    bn = DEFAULT_LAST_BLOCKS if config.last_blocks is None else config.last_blocks
    if fn + bn >= n:
        raise ValueError(
            f"first_blocks={fn}, last_blocks={bn} do not fit {name}'s {n} blocks: need "
            f"first_blocks + last_blocks <= {n - 1} (at least one cached block)"
        )
    return dataclasses.replace(config, first_blocks=fn, last_blocks=bn)
