"""The model options `dcfx profile` and `dcfx graphs` share, and reading a `--model` folder
(also `dcfx demo`): an SD-shaped random-weight U-Net of `--size` or a local diffusers U-Net,
and one denoising call of it with random conditioning.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.sd_shaped import SIZES, random_unet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TOKENS = 77  # text-encoder sequence length of SD-style pipelines


def add_model_arguments(p: argparse.ArgumentParser, resolution_help: str) -> None:
    """--model, --size, --resolution, --batch, --branch, --dtype."""
    p.add_argument("--model", metavar="PATH",
                   help="a local diffusers U-Net folder (config.json and weights) or a pipeline folder with unet/ "
                        "(default: an SD-shaped U-Net of --size)")
    p.add_argument("--size", choices=SIZES, default="sd15",
                   help="SD-shaped U-Net widths (random weights), when no --model (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None, metavar="LATENT", help=resolution_help)
    p.add_argument("--batch", type=int, default=1, help="prompts per call; guidance doubles the U-Net batch (default: 1)")
    p.add_argument("--branch", type=int, default=0, help="DeepCache branch (skip connection) to cut at (default: 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")


def unet_folder(path: str, alternative: str = "") -> tuple[Path, type]:
    """(folder with the U-Net's config.json, its diffusers class) for `--model PATH`: the
    folder itself or its unet/ subfolder. `alternative` names what else the command takes
    there, for the error messages."""
    root = Path(path)
    also = f", or {alternative}" if alternative else ""
    if not root.is_dir():
        raise FileNotFoundError(
            f"--model {path}: no such folder (expected a diffusers U-Net folder, or a pipeline folder with unet/{also})"
        )
    for folder in (root, root / "unet"):
        name = read_json(folder / "config.json").get("_class_name")
        if name in ("UNet2DConditionModel", "UNet2DModel"):
            import diffusers

            return folder, getattr(diffusers, name)
    raise ValueError(
        f"--model {path} is not a diffusers U-Net: expected config.json with _class_name "
        f"UNet2DConditionModel or UNet2DModel in it or in its unet/ subfolder{also}"
    )


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """(U-Net, its name in words) for --model/--size; on the meta device, no weights are
    loaded or initialised (enough for graphs and FLOPs)."""
    if args.model is None:
        torch.manual_seed(0)
        with torch.device(device):  # random init where the weights will live (fast on CUDA)
            unet = random_unet(args.size)
        name = f"{args.size} U-Net ({'meta device, no weights' if device.type == 'meta' else 'random weights'})"
    else:
        folder, cls = unet_folder(args.model)
        if device.type == "meta":
            with torch.device("meta"):
                unet = cls.from_config(cls.load_config(folder))
        else:
            unet = cls.from_pretrained(folder, low_cpu_mem_usage=False, torch_dtype=dtype).to(device)
        name = f"{cls.__name__} from {args.model}{' (config only, meta device)' if device.type == 'meta' else ''}"
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    return unet.eval(), name


def native_resolution(args: argparse.Namespace, unet: nn.Module) -> int:
    """The latent size the model is made for (SD1.5: 64, i.e. 512 px)."""
    if args.model is None:
        return 64 if args.size == "sd15" else 32
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0])


def example_call(
    unet: nn.Module, args: argparse.Namespace, resolution: int, device: torch.device, dtype: torch.dtype
) -> tuple[tuple, dict[str, Any], bool]:
    """(args, kwargs, guided): one denoising call of `unet` for `--batch` prompts, with
    random conditioning; `guided` (U-Nets with text conditioning) doubles the batch for CFG."""
    cfg = unet.config
    params = inspect.signature(unet.forward).parameters
    guided = "encoder_hidden_states" in params
    n = 2 * args.batch if guided else args.batch
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sample = randn(n, cfg.in_channels, resolution, resolution)
    kwargs: dict[str, Any] = {}
    where = f"--model {args.model}" if args.model else args.size
    if getattr(cfg, "class_embed_type", None) is not None:
        raise ValueError(f"{where}: class_embed_type={cfg.class_embed_type!r} needs class conditioning this command does not make up")
    if getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.zeros(n, dtype=torch.long, device=device)
    if guided:
        hid_type = getattr(cfg, "encoder_hid_dim_type", None)
        if hid_type not in (None, "text_proj"):
            raise ValueError(f"{where}: encoder_hid_dim_type={hid_type!r} is not supported here (only text conditioning)")
        width = cfg.encoder_hid_dim if hid_type == "text_proj" else cfg.cross_attention_dim
        if not isinstance(width, int):
            raise ValueError(f"{where}: cross_attention_dim={width!r} per block is not supported here")
        kwargs["encoder_hidden_states"] = randn(n, _tokens(args.model), width)
        added = getattr(cfg, "addition_embed_type", None)
        if added == "text_time":  # SDXL: pooled text embedding and size/crop conditioning
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": randn(n, text), "time_ids": randn(n, 6)}
        elif added is not None:
            raise ValueError(f"{where}: addition_embed_type={added!r} is not supported here (None or 'text_time')")
    timestep = torch.tensor(999, device=device)
    return (sample, timestep), kwargs, guided


def parse_device(text: str) -> torch.device:
    """`--device` as a torch device that exists here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here (use --device cpu)")
    return device


def _tokens(model: str | None) -> int:
    # The embedded digits pipeline conditions on a few label tokens, not on 77 text tokens.
    if model is not None and read_json(Path(model) / "model_index.json").get("_class_name") == "DigitsPipeline":
        return int(read_json(Path(model) / "label_embedding" / "config.json").get("tokens_per_class", _TOKENS))
    return _TOKENS


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} where there is none (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
