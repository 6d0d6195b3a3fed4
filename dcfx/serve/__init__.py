"""Serving with Ray Serve: concurrent HTTP requests batched into pipeline calls, with dcfx.

    from ray import serve
    import dcfx.serve

    serve.run(dcfx.serve.app(settings=["3:0"], max_batch_size=4))
    # POST http://127.0.0.1:8000/ {"label": 3, "seed": 0, "steps": 50, "dcfx": "3:0"}

A replica loads a pipeline (the embedded digits model, or a local diffusers folder) and offers
dcfx *settings* by name: "off" (the plain U-Net) and each fixed-schedule setting it was given
("3:0", "5:0:nonuniform", "2:0:f1"), each on its own copy of the pipeline. With an AOT package
(`package=`, made by `build_package` for the deployment's signature) the dcfx settings run the
packaged graphs: a replica starts without exporting or compiling.

Requests go through Ray Serve's `@serve.batch`, which counts images, so one batch holds at most
`max_batch_size` images and a request's images stay together. The batch is split into groups
that share the dcfx setting, step count and guidance, one pipeline call per group. Each image
has its own seed and its own CPU `torch.Generator`, so its noise is the noise of a local
`pipe(label, generator=torch.Generator().manual_seed(seed))`, whatever its batch-mates.

What "the same image" means: at equal batch size the result does not depend on the
batch-mates or the position (bit for bit, tested), but between batch sizes the CPU's matrix
kernels sum in another order for another row count (the time-embedding GEMMs have one row per
image), so a batched image may differ from the one-image call by about 1e-6 in [0, 1] (4e-7
measured on the digits model; the tests allow 1e-5): the PNG pixels agree unless one sits on
a rounding boundary (none of 40 images' did when measured), and then differ by one level.

One record, `ServeOptions`, says what a deployment serves and how much load it takes; `app`,
`Service`, `build_package` and `dcfx serve` take it (or its fields as keywords).

Modules: `options` (`ServeOptions`, `parse_setting`), `service` (`Service`, a replica's work
without Ray, importable and testable in-process; `build_package`), `package` (a package's
manifest checked against the options), `deployment` (the Ray Serve deployments and `app`: the
one module that imports Ray). `import dcfx` does not import this package; importing it loads
the options only, the rest when first named.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import OFF, ServeOptions, parse_setting

# name -> the module that defines it, imported when the name is first used: `dcfx serve`'s
# parser reads the options without loading a model, and the service runs without Ray.
_LAZY = {
    "BadRequest": "service", "DeadlineExceeded": "service", "Job": "service", "Service": "service",
    "build_package": "service", "DiffusionDeployment": "deployment", "HTTPIngress": "deployment", "app": "deployment",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in ("ray", "starlette"):
            raise
        raise ImportError(f'dcfx.serve.{name} needs Ray Serve, which is not installed: pip install "dcfx[serve]"') from e
    return getattr(module, name)


__all__ = [
    "OFF", "BadRequest", "DeadlineExceeded", "DiffusionDeployment", "HTTPIngress", "Job", "Service", "ServeOptions",
    "app", "build_package", "parse_setting",
]
