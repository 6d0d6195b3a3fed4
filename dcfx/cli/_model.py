"""The model options `dcfx profile` and `dcfx graphs` share: an SD-shaped random-weight U-Net of
`--size`, a local diffusers U-Net or the embedded Flux digits transformer ("flux-digits",
`dcfx.models.load`), and one denoising call of it with random conditioning
(`dcfx.models.example_call`); the cut: `--branch` (a U-Net's), `--first-blocks`/`--last-blocks`
(a transformer's).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ..models.calls import ExampleCall, example_call
from ..models.loader import TEXT_TOKENS, conditioning_tokens, load
from ..models.sd_shaped import SIZES, random_unet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser, resolution_help: str) -> None:
    """--model, --size, --resolution, --batch, --branch, --first-blocks, --last-blocks, --dtype."""
    p.add_argument("--model", metavar="PATH",
                   help="a local diffusers U-Net folder (config.json and weights), a pipeline folder with unet/ or "
                        "transformer/, or flux-digits (the embedded Flux-shaped model) "
                        "(default: an SD-shaped U-Net of --size)")
    p.add_argument("--size", choices=SIZES, default="sd15",
                   help="SD-shaped U-Net widths (random weights), when no --model (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None, metavar="LATENT", help=resolution_help)
    p.add_argument("--batch", type=int, default=1, help="prompts per call; guidance doubles the U-Net batch (default: 1)")
    p.add_argument("--branch", type=int, default=0, help="DeepCache branch (skip connection) to cut at (default: 0)")
    p.add_argument("--first-blocks", type=int, default=None, metavar="FN",
                   help="a transformer's first blocks that always run (default: 1)")
    p.add_argument("--last-blocks", type=int, default=None, metavar="BN",
                   help="a transformer's last blocks that always run (default: 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """(U-Net, its name in words) for --model/--size; on the meta device, no weights are
    loaded or initialised (enough for graphs and FLOPs)."""
    if args.model is None:
        torch.manual_seed(0)
        with torch.device(device):  # random init where the weights will live (fast on CUDA)
            unet = random_unet(args.size)
        name = f"{args.size} U-Net ({'meta device, no weights' if device.type == 'meta' else 'random weights'})"
    else:
        meta = device.type == "meta"
        unet = load(args.model, unet=True, meta=meta, dtype=dtype)
        unet = unet if meta else unet.to(device)
        name = f"{type(unet).__name__} from {args.model}{' (config only, meta device)' if meta else ''}"
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    return unet.eval(), name


def native_resolution(args: argparse.Namespace, unet: nn.Module) -> int:
    """The latent size the model is made for (SD1.5: 64, i.e. 512 px)."""
    if args.model is None:
        return 64 if args.size == "sd15" else 32
    size = getattr(unet.config, "sample_size", None) or 16  # Flux: no sample size (the Flux digits model's 16)
    return int(size if isinstance(size, int) else size[0])


def cut_fields(args: argparse.Namespace) -> dict[str, int | None]:
    """The `DeepCacheConfig` fields of the cut the arguments name."""
    if args.branch < 0:
        raise ValueError(f"--branch must be >= 0, got {args.branch}")
    return dict(branch=args.branch, first_blocks=args.first_blocks, last_blocks=args.last_blocks)


def model_call(unet: nn.Module, args: argparse.Namespace, resolution: int, device: torch.device,
               dtype: torch.dtype) -> ExampleCall:
    """One denoising call of `unet` for `--batch` prompts with random conditioning
    (`dcfx.models.example_call`), as the --model's pipeline would condition it."""
    tokens = conditioning_tokens(args.model) if args.model is not None else TEXT_TOKENS
    return example_call(unet, args.batch, resolution, tokens=tokens, device=device, dtype=dtype)


def parse_device(text: str) -> torch.device:
    """`--device` as a torch device that exists here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here (use --device cpu)")
    return device
