"""What the class-conditional demo pipelines share: label checks, output types, folder loading.

`DigitsPipeline` (U-Net, DDIM) and `FluxDigitsPipeline` (Flux transformer, flow matching) take
the same labels, return the same image types and load from folders in diffusers' layout the
same way; the rules for each live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

OUTPUT_TYPES = ("pil", "np", "pt")


def class_labels(labels: int | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """One or more integer labels in 0..num_classes-1 as a flat int64 tensor; ValueError otherwise."""
    values = torch.as_tensor(labels).reshape(-1)
    if values.numel() == 0 or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(f"labels must be one or more integer classes in 0..{num_classes - 1}, got {labels!r}")
    bad = [int(v) for v in values.tolist() if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"unknown label(s) {bad}: this model draws the classes 0..{num_classes - 1}")
    return values.to(torch.int64)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


def to_output(pixels: torch.Tensor, output_type: str):
    """(B, C, H, W) pixels in [-1, 1] -> [0, 1] as a tensor ("pt"), a (B, H, W, C) array ("np")
    or PIL images ("pil")."""
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    return DiffusionPipeline.numpy_to_pil(images) if output_type == "pil" else images


def load_folder(
    path: str | Path,
    pipeline: type[DiffusionPipeline],
    models: dict[str, type[ModelMixin]],
    default_scheduler: type[SchedulerMixin],
    scheduler: SchedulerMixin | None,
    model: str,
    trainer: str,
) -> DiffusionPipeline:
    """`pipeline` from a folder in diffusers' layout (as the `trainer` module writes it): each of
    `models` (component name -> class) from its subfolder, in eval mode, and `scheduler`, or
    `default_scheduler` from `scheduler/`.

    Raises FileNotFoundError naming the missing files, or ValueError for a file that does not
    load (corrupt or of another model).
    """
    path = Path(path)
    expected = [f"{name}/{file}" for name in models for file in ("config.json", "diffusion_pytorch_model.safetensors")]
    expected.append("scheduler/scheduler_config.json")
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a {model} model folder: missing {', '.join(missing)} (expected "
            f"{', '.join(expected)}; `python -m {trainer} --out {path}` writes them)"
        )
    try:
        # low_cpu_mem_usage=False: the models are small, and the default wants `accelerate`.
        components = {name: cls.from_pretrained(path / name, low_cpu_mem_usage=False).eval() for name, cls in models.items()}
        if scheduler is None:
            scheduler = default_scheduler.from_pretrained(path / "scheduler")
    except Exception as e:  # safetensors, json and diffusers each raise their own types
        raise ValueError(f"the {model} model in {path} could not be loaded (corrupt or foreign file?): {e}") from e
    pipe = pipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(leave=False)
    return pipe
