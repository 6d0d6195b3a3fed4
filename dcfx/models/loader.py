"""One loader for the models dcfx's commands take: `load(model)`.

`model` names the embedded digits model (None or "digits"), the embedded Flux-shaped digits
model ("flux-digits", a `FluxDigitsPipeline` around a `FluxTransformer2DModel`), or a local
folder: a digits model folder (`model_index.json` of a `DigitsPipeline` or a
`FluxDigitsPipeline`, as `train_digits` / `train_flux_digits` write them), another
diffusers pipeline folder (`model_index.json`), or a diffusers U-Net folder (`config.json` of a
`UNet2DConditionModel` or `UNet2DModel`, in the folder or in its `unet/`). Nothing is
downloaded. `model_kind` and `describe` say what a name is without loading it. The
*denoiser* is a pipeline's `unet`, or its `transformer` (the Flux digits model's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .digits import TOKENS_PER_CLASS, WEIGHTS_DIR, digits, load_pipeline
from .flux_digits import WEIGHTS_DIR as FLUX_WEIGHTS_DIR
from .flux_digits import load_flux_digits

DIGITS = "digits"
FLUX_DIGITS = "flux-digits"
UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
DENOISER_FOLDERS = ("unet", "transformer")  # where a pipeline folder keeps its denoiser
TEXT_TOKENS = 77  # text-encoder sequence length of SD-style pipelines
_TAKES = (
    "a diffusers pipeline folder (model_index.json, e.g. of a DigitsPipeline), or a U-Net folder "
    f"(config.json with _class_name {' or '.join(UNET_CLASSES)}, in it or in its unet/ subfolder)"
)


def model_kind(model: str | os.PathLike | None) -> str:
    """What `model` names: "digits" (the digits model, embedded or a folder of it),
    "flux-digits" (likewise), "pipeline" (another diffusers pipeline folder) or "unet" (a
    U-Net folder). Raises
    FileNotFoundError for a missing folder and ValueError for a folder of something else."""
    return _resolve(model)[0]


def describe(model: str | os.PathLike | None) -> str:
    """`model` in words, for messages: "the digits model", "StableDiffusionPipeline from PATH"."""
    kind, name, root = _resolve(model)
    if kind in (DIGITS, FLUX_DIGITS):
        what = "the digits model" if kind == DIGITS else "the Flux digits model"
        return what if root in (WEIGHTS_DIR, FLUX_WEIGHTS_DIR) else f"{what} in {model}"
    return f"{name} from {model}"


def load(model: str | os.PathLike | None = None, *, unet: bool = False, meta: bool = False,
         dtype: torch.dtype | None = None) -> Any:
    """The model `model` names (module docstring), in eval mode: a pipeline for pipeline
    folders and the digits model, a U-Net for U-Net folders.

    `unet`: the denoiser only (a pipeline folder's `unet/` or `transformer/`; nothing else is
    read). `meta`: the denoiser only, built from its config on the meta device (no weights read
    or initialised: enough for graphs and FLOPs). `dtype`: the floating-point type of what is
    returned.
    """
    kind, name, root = _resolve(model)
    if unet or meta or kind == "unet":
        folder = _unet_folder(root)
        if folder is None:
            raise ValueError(f"{model} holds no U-Net: expected {_TAKES}")
        import diffusers

        cls = getattr(diffusers, _class_name(folder / "config.json"))
        if meta:
            with torch.device("meta"):
                out = cls.from_config(cls.load_config(folder))
        else:
            # low_cpu_mem_usage=False: the default wants `accelerate`.
            out = cls.from_pretrained(folder, low_cpu_mem_usage=False, torch_dtype=dtype)
        out = out.eval()
    elif kind == DIGITS:
        out = digits() if root == WEIGHTS_DIR else load_pipeline(root)
    elif kind == FLUX_DIGITS:
        out = load_flux_digits(root)
    else:
        from diffusers import DiffusionPipeline

        out = DiffusionPipeline.from_pretrained(root)
        if not any(getattr(out, f, None) is not None for f in DENOISER_FOLDERS):
            raise ValueError(f"{model}: {name} has no U-Net or transformer, so dcfx has nothing to cache")
    if dtype is not None and getattr(out, "dtype", dtype) != dtype:
        out = out.to(dtype=dtype)
    return out


def conditioning_tokens(model: str | os.PathLike | None) -> int:
    """How many conditioning tokens `model`'s pipeline gives its denoiser per row: the digits
    models' label tokens, else a text encoder's 77."""
    kind, _, root = _resolve(model)
    if kind not in (DIGITS, FLUX_DIGITS):
        return TEXT_TOKENS
    return int(read_json(root / "label_embedding" / "config.json").get("tokens_per_class", TOKENS_PER_CLASS))


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} where there is none (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _resolve(model: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(kind, class name, folder) of `model`."""
    if model is None or (str(model) == DIGITS and not Path(model).exists()):
        return DIGITS, "DigitsPipeline", WEIGHTS_DIR
    if str(model) == FLUX_DIGITS and not Path(model).exists():
        return FLUX_DIGITS, "FluxDigitsPipeline", FLUX_WEIGHTS_DIR
    root = Path(model)
    if not root.is_dir():
        raise FileNotFoundError(f"{model}: no such folder (expected {_TAKES}, or {DIGITS!r} or {FLUX_DIGITS!r})")
    pipeline = read_json(root / "model_index.json").get("_class_name")
    if pipeline is not None:
        kinds = {"DigitsPipeline": DIGITS, "FluxDigitsPipeline": FLUX_DIGITS}
        return kinds.get(pipeline, "pipeline"), str(pipeline), root
    folder = _unet_folder(root)
    if folder is None:
        raise ValueError(f"{model} is not a diffusers U-Net or pipeline folder: expected {_TAKES}")
    return "unet", _class_name(folder / "config.json"), root


def _unet_folder(root: Path) -> Path | None:
    """The folder with the denoiser's config.json: `root` itself (a U-Net), or its unet/ or
    transformer/ (a supported transformer class)."""
    if _class_name(root / "config.json") in UNET_CLASSES:
        return root
    return next((f for f in (root / name for name in DENOISER_FOLDERS) if _denoiser(_class_name(f / "config.json"))), None)


def _denoiser(name: str | None) -> bool:
    # Any diffusion transformer class: dcfx.optimize names the ones it supports.
    return name in UNET_CLASSES or (name or "").endswith(("Transformer2DModel", "Transformer3DModel"))


def _class_name(config: Path) -> str | None:
    return read_json(config).get("_class_name")
