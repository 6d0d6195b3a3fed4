"""AOT packages: a DeepCache U-Net's two graphs, compiled ahead of time, in one file.

`package(fast, path, *args, **kwargs)` takes the full and the shallow graph that `fast` runs
for a call with these arguments (`DeepCacheUNet.graphs`), exports each with torch.export,
compiles each with AOTInductor and writes both, with a manifest, into one `.pt2` file.
`load_package(path)` gives back a `DeepCacheUNet` that runs them: no U-Net, no export, no
compile, and every runtime feature (steps, guidance slots, `begin`, `history`, pipelines).

The file is torch's PT2 archive (a zip):
- `data/aotinductor/full/`, `data/aotinductor/shallow/`: the compiled models (shared
  libraries, and the C++ they were built from);
- `data/weights/`: the weights, each tensor once. Both models are compiled without their
  constants (`aot_inductor.package_constants_in_so=False`, `pickle_weights` on disk), and
  torch's packager stores tensors that share storage once: the shallow graph's weights are
  a subset of the full graph's, so nothing is stored twice. Loading hands the same tensors
  to both models (`user_managed`), so they are in memory once too;
- `extra/dcfx.json`: the manifest (format, dcfx and torch versions, the `DeepCacheConfig`, the
  graphs' `CacheLayout`, the signature in words and its batch, each graph's FLOPs, the U-Net's
  class, forward parameters and diffusers config, dtype, device, the input and output tree
  specs in torch's JSON) and, pickled, what else the runtime needs exactly (signature key
  leaves, config, forward signature).

A package holds one input signature (shapes, dtypes, devices and non-tensor arguments, as
the pipeline passes them) on one device type, and its CPU kernels need the vector ISA they
were compiled for (checked at load). A call with another signature raises a ValueError
naming both. Loading wants the torch version it was built with (the shared libraries are
built against it; another version warns, and may fail to load) and imports dcfx, which
registers the fused cut op the shallow graph calls (AOTInductor calls Python-registered
custom ops through its proxy executor, in a process where they exist).

Packages contain native code and pickles: load only packages you trust.

Uses torch's AOTInductor (`torch._inductor.aot_compile`, as torch documents for several
models in one package), and its PT2 packager and model loader, which are private: see
`dcfx._torch_private` (items 4, 6 and 12) for why, and for the versions checked.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import inspect
import io
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.export.pt2_archive.constants import AOTINDUCTOR_DIR, WEIGHTS_DIR

from . import _torch_private as _private
from ._torch_private import pytree
from .kernels import ops as kernel_ops  # noqa: F401  (registers the dcfx ops that packaged graphs call)
from .signature import describe_signature
from .compile import TRACING
from .config import DeepCacheConfig
from .passes import CacheLayout
from .runtime import DeepCacheUNet, PackagedModel
from .version import __version__

# The manifest's format; a reader refuses other formats.
FORMAT = 2
_MANIFEST = "dcfx.json"


def package(fast: DeepCacheUNet, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Compile `fast`'s full and shallow graph for this call with AOTInductor, into one file.

    Call it with `path` (ending in `.pt2`) and then the arguments exactly as the pipeline
    calls the U-Net: tensor shapes, dtypes and devices, and the non-tensor arguments it
    passes (also `timestep_cond=None` and the like; `return_dict` aside) are the package's
    one input signature. Runs one full step eagerly to get example cached tensors, then
    compiles both graphs (about as long as a cold `compile=True`) with the config's
    `compile_options` or `compile_mode` (its CUDA graphs aside); the config's `compile`
    flag does not matter. Returns the path written; a file already there is replaced once
    the new one is complete.
    """
    if not isinstance(fast, DeepCacheUNet):
        raise TypeError(f"package expects a DeepCacheUNet (from dcfx.optimize), got {type(fast).__name__}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"a package's file name must end in .pt2 (torch's archive format), got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {str(path.parent)!r}")
    _require_weights_on_disk()
    graphs = fast.graphs(*args, **kwargs)
    config = fast.deepcache_config
    unet = fast.unet
    with TRACING.exclusive(), torch.no_grad():  # export traces: no graph may run meanwhile
        files = {}
        inputs = tuple(graphs.inputs)
        if graphs.head is not None:
            files["head"] = _aot_compile(graphs.head, inputs, config)
            inputs = inputs + tuple(graphs.head(*inputs))
        cached = graphs.layout.example_cached(graphs.full(*inputs))
        files[graphs.layout.full_kind] = _aot_compile(graphs.full, inputs, config)
        files[graphs.layout.shallow_kind] = _aot_compile(graphs.shallow, inputs + cached, config)
    manifest = _manifest(unet, config, graphs)
    # Written next to `path` under its name (the archive's root folder is named after the
    # file), then moved over it: a failed write leaves no partial package behind.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        written = os.path.join(tmp, path.name)
        _private.package_pt2(written, aoti_files=files, extra_files={_MANIFEST: json.dumps(manifest, indent=1)})
        os.replace(written, path)
    return path


def load_package(path: str | os.PathLike, device: str | torch.device | None = None) -> DeepCacheUNet:
    """A `DeepCacheUNet` running the graphs of a package written by `package`.

    It takes the packaged input signature only (another raises a ValueError naming both),
    keeps all of the runtime's behaviour (`begin`, `history`, guidance slots, automatic
    generation boundaries), and stands in for the U-Net in pipelines: `config` (the
    U-Net's diffusers config), `dtype` and `device` are the packaged U-Net's. It holds no
    U-Net: it cannot capture other signatures, be re-packaged or be pickled.

    `device`: where to run, of the packaged device's type (None: the packaged device; a
    package built on `cuda:0` may run on `cuda:1`).
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_versions(manifest, path)
    try:
        record = pickle.loads(base64.b64decode(manifest["pickled"]))
    except Exception as e:
        raise ValueError(
            f"{path}: this dcfx {__version__} and torch {torch.__version__} cannot read the record "
            f"that dcfx {manifest['dcfx']} and torch {manifest['torch']} wrote ({type(e).__name__}: {e}); "
            f"package the U-Net again"
        ) from None
    packaged = torch.device(manifest["device"])
    target = packaged if device is None else torch.device(device)
    if target.type != packaged.type:
        raise ValueError(
            f"{path} was compiled for {packaged.type} and runs only there (its signature: "
            f"{manifest['signature']}); got device={str(target)!r}"
        )
    if target.type != "cpu" and target.index is None:
        target = torch.device(target.type, torch.get_device_module(target.type).current_device())
    key = (_spec_loads(manifest["in_spec"]), record["leaves"], record["autocast"])
    key = _on_device(key, packaged, target)
    layout = CacheLayout.from_dict(manifest["layout"])
    runners = _load_models(path, target, layout.graphs)
    out_spec = _spec_loads(manifest["out_spec"])
    stub = _PackagedUNet(key, out_spec, layout, runners, record["forward"], manifest, target, path)
    return DeepCacheUNet(stub, record["config"])


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A package's manifest (the JSON `package` wrote: versions, config, signature, ...),
    without loading its models.

    Checks every member's CRC (the whole file is read; torch's loader checks none), and
    raises FileNotFoundError for a missing file and ValueError for a file that is not a
    dcfx package, is damaged, or has another package format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dcfx package at {str(path)!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a dcfx package (no zip archive: damaged, or not written by dcfx.package)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{_MANIFEST}")]
            if not names:
                raise ValueError(f"{path} is a .pt2 archive without a dcfx manifest: not written by dcfx.package")
            manifest = json.loads(archive.read(names[0]))
            # A truncated or altered archive: check every member now, not at a model's load.
            damaged = archive.testzip()
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is a damaged dcfx package: {e}") from None
    if damaged is not None:
        raise ValueError(f"{path} is a damaged dcfx package: {damaged} fails its checksum")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{path} has dcfx package format {found!r}; this dcfx reads format {FORMAT} "
            f"(package the U-Net again with this version)"
        )
    return manifest


# -- packaging ----------------------------------------------------------------------------


def _require_weights_on_disk() -> None:
    if "aot_inductor.package_constants_on_disk_format" not in _private.inductor_options():
        raise RuntimeError(
            f"torch {torch.__version__} lacks AOTInductor's on-disk weights "
            f"(aot_inductor.package_constants_on_disk_format), which dcfx packages use; "
            f"dcfx supports torch 2.11-2.13"
        )


def _inductor_options(config: DeepCacheConfig) -> dict[str, Any]:
    if config.compile_mode is not None:
        options = _private.inductor_mode_options(config.compile_mode)
        # Inductor's CUDA graphs belong to torch.compile's runtime, not to AOTInductor.
        options.pop("triton.cudagraphs", None)
    else:
        options = dict(config.compile_options)
    options.update({
        "aot_inductor.package": True,
        # Constants outside the shared libraries, so the packager can store each weight once.
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "pickle_weights",
    })
    return options


def _aot_compile(graph: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], config: DeepCacheConfig) -> list:
    """AOTInductor's files for `graph` (a flat GraphModule over tensors) on these inputs."""
    exported = torch.export.export(graph, inputs, strict=False)
    return _private.aot_compile(exported.module(), inputs, _inductor_options(config))


def _manifest(unet: nn.Module, config: DeepCacheConfig, graphs: Any) -> dict[str, Any]:
    first = next(iter(unet.parameters()), None)
    dtype = first.dtype if first is not None else graphs.inputs[0].dtype
    forward = inspect.signature(unet.forward)
    # Annotations may name classes a loading process lacks; pipelines need names, kinds and defaults.
    forward = forward.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in forward.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    unet_config = getattr(unet, "config", None)
    spec, leaves, autocast = graphs.key
    record = {"leaves": leaves, "autocast": autocast, "config": config, "forward": forward}
    return {
        "format": FORMAT,
        "dcfx": __version__,
        "torch": torch.__version__,
        "unet": type(unet).__name__,
        "signature": graphs.signature,
        "batch": int(graphs.inputs[0].shape[0]), "flops": dict(graphs.cost.flops),  # the sample's rows; dcfx.costs
        "device": str(graphs.inputs[0].device),
        "dtype": str(dtype).removeprefix("torch."),
        "layout": graphs.layout.to_dict(),
        "config": {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)},
        "forward": [p.name for p in forward.parameters.values()],
        "unet_config": _jsonable(dict(unet_config)) if isinstance(unet_config, Mapping) else None,
        # Tree specs in torch's versioned JSON (a pickled TreeSpec depends on its classes).
        "in_spec": _spec_dumps(spec),
        "out_spec": _spec_dumps(graphs.out_spec),
        "pickled": base64.b64encode(pickle.dumps(record)).decode("ascii"),
    }


def _spec_dumps(spec: pytree.TreeSpec) -> dict[str, Any]:
    """`spec` as JSON, with the modules that register its node types (e.g. diffusers' output
    classes) to import before reading it back."""
    text = pytree.treespec_dumps(spec)
    types: set[str] = set()

    def walk(node: dict) -> None:
        if node["type"] is not None:
            types.add(node["type"])
        for child in node["children_spec"]:
            walk(child)

    walk(json.loads(text)[1])
    modules = {pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[t].__module__ for t in types}
    return {"treespec": text, "modules": sorted(modules - {"builtins", "collections"})}


def _spec_loads(record: dict[str, Any]) -> pytree.TreeSpec:
    for module in record["modules"]:
        importlib.import_module(module)
    return pytree.treespec_loads(record["treespec"])


def _jsonable(value: Any) -> Any:
    """`value` as JSON (as diffusers writes a config: tuples as lists, mappings as objects),
    reprs for the rest."""
    return json.loads(json.dumps(value, default=lambda v: dict(v) if isinstance(v, Mapping) else repr(v)))


# -- loading ------------------------------------------------------------------------------


def _check_versions(manifest: dict[str, Any], path: Path) -> None:
    if manifest["torch"] != torch.__version__:
        warnings.warn(
            f"{path} was built with torch {manifest['torch']}, this is torch {torch.__version__}: "
            f"its compiled models may fail to load or run; package the U-Net again with this torch",
            stacklevel=3,
        )
    if manifest["dcfx"] != __version__:
        warnings.warn(
            f"{path} was built with dcfx {manifest['dcfx']}, this is dcfx {__version__}: if the "
            f"dcfx ops it calls have changed, package the U-Net again",
            stacklevel=3,
        )


def _on_device(key: tuple, packaged: torch.device, target: torch.device) -> tuple:
    """The signature key with the packaged device's tensors on `target` instead."""
    if target == packaged:
        return key
    spec, leaves, autocast = key
    # Tensor leaves are ("T", shape, dtype, device); others are constants.
    moved = tuple((*leaf[:3], target) if leaf[0] == "T" and leaf[3] == packaged else leaf for leaf in leaves)
    return spec, moved, autocast


def _load_models(path: Path, device: torch.device, models: tuple[str, ...]) -> dict[str, Callable]:
    """The packaged models, sharing one copy of the weights.

    What torch's `load_pt2(..., load_weights_from_disk=True)` does, without its check of the
    machine: that compiles probe programs for every vector ISA when inductor's cache folder
    is empty (about 10 s here), which is the fresh machine a package is for. The CPU check
    here reads the CPU's features instead.
    """
    index = device.index if device.index is not None else -1
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = next(n for n in names if n.endswith(f"/extra/{_MANIFEST}")).split("/")[0]
        missing = [m for m in models if f"{root}/{AOTINDUCTOR_DIR}{m}/weights_config.json" not in names]
        if missing:
            raise ValueError(f"{path} is a damaged dcfx package: it lacks the {', '.join(missing)} model")
        # weight name -> (file, shape, stride, storage offset), per model
        configs = {m: json.loads(archive.read(f"{root}/{AOTINDUCTOR_DIR}{m}/weights_config.json")) for m in models}
        files = {entry[0] for config in configs.values() for entry in config.values()}
        stored = {
            f: torch.load(io.BytesIO(archive.read(f"{root}/{WEIGHTS_DIR}{f}")), map_location=device, weights_only=True)
            for f in files
        }
    runners = {}
    for name in models:
        try:
            _check_machine(_private.aoti_metadata(str(path), name), path)
            runner = _private.load_aoti_model(str(path), name, index)
            weights = {
                fqn: stored[file].as_strided(shape, stride, offset)
                for fqn, (file, shape, stride, offset) in configs[name].items()
            }
            # user_managed: both models use these very tensors, so the weights are in memory once.
            runner.load_constants(weights, check_full_update=True, user_managed=True)
        except Exception as e:
            e.add_note(f"dcfx: loading the {name} model of {path} failed (a package built by another torch?)")
            raise
        runners[name] = runner
    return runners


# The base vector ISAs of CPU packages (the first word of AOTI_CPU_ISA), weakest first, as
# `torch.backends.cpu.get_cpu_capability()` names what this CPU runs.
_CPU_ISAS = ("AVX2", "AVX512")


def _check_machine(metadata: dict[str, str], path: Path) -> None:
    isa = metadata.get("AOTI_CPU_ISA", "").split()
    if metadata.get("AOTI_DEVICE_KEY") != "cpu" or not isa or isa[0] not in _CPU_ISAS:
        return
    have = torch.backends.cpu.get_cpu_capability()
    if have not in _CPU_ISAS or _CPU_ISAS.index(have) < _CPU_ISAS.index(isa[0]):
        raise RuntimeError(
            f"{path} was compiled for CPUs with {isa[0]} and this CPU runs {have} "
            f"(torch.backends.cpu.get_cpu_capability(); the ATEN_CPU_CAPABILITY variable may "
            f"lower it): its kernels would stop at an illegal instruction; package the U-Net "
            f"on this kind of machine"
        )
    # Extras (VNNI, AMX) only warn: inductor's default kernels do not use them.
    lacking = [x for x in isa[1:] if _private.cpu_has(x) is False]
    if lacking:
        warnings.warn(f"{path} was compiled on a CPU with {', '.join(lacking)}, which this CPU lacks", stacklevel=4)


class _PackagedUNet(PackagedModel):
    """Stands in for the packaged U-Net inside the `DeepCacheUNet` that `load_package` returns.

    It has the U-Net's forward signature (the runtime binds calls with it), `config`, `dtype`
    and `device`, and no weights: the compiled graphs hold those.
    """

    def __init__(self, key: tuple, out_spec: pytree.TreeSpec, layout: CacheLayout, runners: dict[str, Callable],
                 forward: inspect.Signature, manifest: dict[str, Any], device: torch.device, path: Path):
        super().__init__()
        self.key, self.signature, self.out_spec, self.layout = key, describe_signature(key), out_spec, layout
        self.runners = runners
        self._dtype = getattr(torch, manifest["dtype"])
        self._device = device
        self._name = manifest["unet"]
        self._path = path
        if manifest["unet_config"] is not None:
            from diffusers.configuration_utils import FrozenDict

            self.config = FrozenDict(manifest["unet_config"])

        def run(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"the {self._name} of {path} has no weights of its own: call the DeepCacheUNet "
                f"that load_package returned"
            )

        run.__signature__ = forward
        self.forward = run

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def check(self, config: DeepCacheConfig) -> None:
        layout = self.layout
        if not layout.cut.runs(config):
            raise ValueError(
                f"{self._path} holds the graphs of {layout.cut.describe()}; a config with cut "
                f"{config.cut_word} needs another package"
            )
        packaged = (layout.head, layout.forecast)
        if (config.needs_head, config.forecast) != packaged:
            raise ValueError(
                f"{self._path} holds the graphs of a policy with head={packaged[0]}, forecast={packaged[1]}; "
                f"a config with adaptive={config.adaptive!r}, forecast={config.forecast} needs another package"
            )

    def extra_repr(self) -> str:
        return f"{self._name} from {str(self._path)!r}: {self.signature}"
