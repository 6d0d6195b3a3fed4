"""`dcfx graphs`: write the full and the shallow graph's code, and where the U-Net is cut.

Captures one call of a U-Net, as `dcfx.optimize` would, and writes `full.py` and `shallow.py`
(each graph's readable code, marked with the U-Net module every stretch comes from) and
`cut.txt` (`DeepCacheGraphs.cut`: the cached tensors with their shapes and bytes, the modules
a shallow step runs and those it skips) into `--out DIR`, and prints the cut. The model is
built on the meta device (no weights are initialised or loaded, nothing is computed): the
SD1.5 architecture by default, or the config of a local diffusers U-Net (`--model PATH`).
The same is `DeepCacheUNet.graphs(*args, **kwargs)` in Python.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..api import optimize
from ..config import DeepCacheConfig
from ..inspection import WRITTEN_BY
from ._model import DTYPES, add_model_arguments, build_model, cut_fields, model_call, native_resolution

FILES = ("full.py", "shallow.py", "cut.txt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("dcfx-graphs"), metavar="DIR",
                   help="folder to write into (default: %(default)s)")
    add_model_arguments(p, "latent height and width (default: the model's, e.g. 64 = 512 px for sd15)")
    p.add_argument("--no-fuse", action="store_true", help="the shallow graph without the fuse pass (fuse_cut=False)")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that dcfx did not write")


def check_out(directory: Path, force: bool) -> None:
    """Refuses to overwrite full.py/shallow.py/cut.txt that dcfx did not write, unless forced."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"--out {directory} is a file, not a folder")
    for name in FILES:
        path = directory / name
        if path.exists() and not force:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    ours = f.readline().rstrip("\n") == WRITTEN_BY
            except OSError:
                ours = False
            if not ours:
                raise FileExistsError(
                    f"{path} exists and was not written by dcfx: choose another --out, or pass --force to overwrite it"
                )


def run(args: argparse.Namespace) -> str:
    """Writes the files; prints (and returns) the cut."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
    cut = cut_fields(args)
    check_out(args.out, args.force)
    meta, dtype = torch.device("meta"), DTYPES[args.dtype]
    unet, name = build_model(args, meta, dtype)
    resolution = args.resolution or native_resolution(args, unet)
    call_args, kwargs, _ = model_call(unet, args, resolution, meta, dtype)
    fast = optimize(unet, DeepCacheConfig(**cut, fuse_cut=not args.no_fuse))
    graphs = fast.graphs(*call_args, **kwargs)
    paths = graphs.write(args.out, overwrite=True)  # check_out refused what dcfx did not write
    text = (
        f"dcfx graphs: {name}, latent {resolution}x{resolution}, {args.dtype}\n"
        f"input signature: {graphs.signature}\n\n{graphs.cut}\n\n"
        f"wrote {', '.join(str(p) for p in paths)}"
    )
    print(text)
    return text
