"""The AOT package a deployment starts from: written with `dcfx.package` for the deployment's
signature (`max_batch_size` images with guidance), checked against a deployment's options by
its manifest alone (`dcfx.aot.read_manifest`: no model is loaded), which also holds the graphs'
FLOPs. The manifest is the package's one record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import optimize, package
from ..aot import read_manifest
from .options import ServeOptions, parse_setting


def check(options: ServeOptions) -> dict[str, Any]:
    """The manifest of `options.package`, checked against the options: a package holds the
    guided batch of `max_batch_size` images, and the graphs of one branch and forecast, which
    every dcfx setting must use. Errors name what the package was built for."""
    path = Path(options.package)
    manifest = read_manifest(path)
    batch, flops = manifest.get("batch"), manifest.get("flops")
    if batch is None or flops is None:
        raise ValueError(f"{path} has no batch size or FLOPs in its manifest: package it again with this dcfx")
    signature = manifest["signature"]
    if batch % 2:
        raise ValueError(
            f"{path} holds a batch of {batch} U-Net rows ({signature}), not the guided batch of whole images "
            f"that dcfx serve runs: write it with dcfx.serve.build_package (or `dcfx serve --build-package`)"
        )
    if batch // 2 != options.max_batch_size:
        raise ValueError(
            f"{path} was built for max_batch_size={batch // 2} (its signature: {signature}); this deployment "
            f"has max_batch_size={options.max_batch_size}"
        )
    layout = manifest["layout"]
    branch, forecast = layout["cut"]["branch"], layout["forecast"]
    configs = [c for c in (parse_setting(s)[1] for s in options.settings) if c is not None]
    wrong = sorted({str(c.branch) for c in configs if c.branch != branch})
    if wrong:
        raise ValueError(
            f"{path} holds the graphs of branch {branch}; dcfx settings with branch {', '.join(wrong)} need another package"
        )
    if any(c.forecast != forecast for c in configs):
        raise ValueError(f"{path} holds the graphs of forecast order {forecast}; every dcfx setting here must use f{forecast}")
    return manifest


def row_flops(manifest: dict[str, Any]) -> tuple[int, int]:
    """FLOPs of a full and of a shallow call per row (one image without guidance) of the
    packaged graphs, from the manifest (counted by `dcfx.costs` when it was written)."""
    rows = manifest["batch"]
    return manifest["flops"]["full"] // rows, manifest["flops"]["shallow"] // rows


def write(path: str | Path, unet: torch.nn.Module, config: Any, args: tuple, kwargs: dict, overwrite: bool = False) -> Path:
    """Package `unet`'s graphs of `config` for this U-Net call at `path`. Replaces an earlier
    dcfx package there, and another file only with `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        try:
            read_manifest(path)
        except ValueError:
            raise FileExistsError(
                f"{path} exists and was not written by dcfx serve (it is no dcfx package): choose another path, "
                f"or overwrite it"
            ) from None
    return package(optimize(unet, config), path, *args, **kwargs)
