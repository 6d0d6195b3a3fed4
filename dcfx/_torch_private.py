"""Every private torch API dcfx relies on, in one module.

dcfx supports torch 2.11-2.13. `tests/test_torch_private.py` exercises every item and fails
with a message that names it, so a torch release that moves or changes one shows up there,
not as a wrong result. Checked: every item on torch 2.13.0 (CPU), items 7-9 on 2.11.0 (in
the CUDA tests).

Each item says why no public API does the job. The items:

1. torch.compile's module wrapper (`torch._dynamo.eval_frame.OptimizedModule`, its
   `_orig_mod` and `dynamo_ctx`, and `_torchdynamo_orig_backend` on dynamo's frame
   callbacks): which module a `torch.compile(module)` wraps and with which backend. dcfx
   compiles its two graphs with the settings of a wrapper around the U-Net or around
   dcfx's own module; torch has no public accessor for a wrapper's settings.
2. `nn.Module.compile()`'s state (`_compiled_call_impl` and the dynamo context in its
   closure): whether and how a U-Net was compiled in place before `dcfx.optimize`.
3. The calling thread's stack (`sys._getframe`), searched for a torch.compile wrapper's
   call frame: which wrapper the current call runs inside. The frames of the calling
   thread only, so each thread (and each call) finds its own wrapper.
4. AOTInductor's package loader (`torch._C._aoti.AOTIModelPackageLoader`, wrapped in
   `torch.export.pt2_archive._package.AOTICompiledModel`) and PT2 packager
   (`torch.export.pt2_archive._package.package_pt2`). The public loader,
   `torch._inductor.aoti_load_package(path)`, loads only a model named "model", and the
   loader torch documents for named models, `torch._inductor.package.load_package(path,
   name)`, loads every model of the file on each call and first checks the machine by
   compiling probe programs for every CPU vector ISA (14.1 s with an empty inductor
   cache folder, against 0.3-0.6 s for dcfx's loading). The public writer,
   `torch._inductor.package.package_aoti`, cannot store dcfx's manifest.
5. `torch.ops.aten._assert_tensor_metadata`: the dtype/device assertions torch.export puts
   into a graph, which dcfx removes (they would keep the deep path alive in the shallow
   graph). An operator, not a Python API, but a private one.
6. CPU feature checks for AVX512-VNNI and AMX tiles (`torch.cpu._is_vnni_supported`,
   `torch.cpu._is_amx_tile_supported`): whether this CPU has the extras an AOT package
   was compiled with. `torch.backends.cpu.get_cpu_capability()` (public) answers the base
   ISA only.
7. torch's pytree (`torch.utils._pytree`): flattening a call's arguments and rebuilding
   outputs, with specs serialised into packages. torch has no public pytree module.
8. A tensor's in-place version counter (`Tensor._version`): whether a sample or a
   conditioning tensor passed again is unmodified since, read on the host without a device
   sync. torch has no public accessor.
9. Whether a profiler is recording (`torch.autograd._profiler_enabled`): the runtime enters
   its per-step `record_function` ranges only then, so they cost nothing otherwise. torch
   has no public query.
10. An operator overload's schema (`torch._ops.OpOverload`, its `_schema` and `_overloadname`): which aten
   operators in an exported graph write into their first argument (FreeU's in-place slice
   writes), and their out-of-place twins, so that `passes/functional.py` can rewrite them out of the graph. torch's public
   functionalization runs at trace time, not on an existing FX graph.
11. The logger of torch's fake tensors (`torch._subclasses.fake_tensor`), which reports a
   failed export at error level: capture holds its records back while it tries the plain
   U-Net for a clearer error. torch has no public switch for those records.
12. Inductor's AOT compile, option lists and config (`torch._inductor.aot_compile`,
   `list_options`, `list_mode_options`, `torch._inductor.config.patch`): the AOTInductor
   compile torch documents for a package of several models, whether this torch has the
   on-disk weights format packages use, a compile mode's options (AOTInductor takes options,
   not modes), and kernel names in `dcfx profile`'s CPU traces (`cpp.enable_kernel_profile`).
   torch has them under `torch._inductor` only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.utils._pytree as pytree  # noqa: F401  (item 7; re-exported for dcfx's modules)
from torch import nn
from torch._dynamo.eval_frame import DisableContext, OptimizedModule, _TorchDynamoContext

__all__ = [
    "AOTICompiledModel",
    "NOT_COMPILED",
    "EXPORT_ERROR_LOGGERS",
    "OptimizedModule",
    "UNREADABLE",
    "aot_compile",
    "aoti_metadata",
    "cpu_has",
    "enclosing_compile_wrapper",
    "export_assert_op",
    "out_of_place",
    "in_place_compile_backend",
    "inductor_config_patch",
    "inductor_mode_options",
    "inductor_options",
    "load_aoti_model",
    "package_pt2",
    "profiler_enabled",
    "pytree",
    "tensor_version",
    "unwrap_compiled",
    "wrapper_backend",
    "writes_first_argument",
]

# -- 1. torch.compile's module wrapper --------------------------------------------------------


def unwrap_compiled(module: Any) -> Any:
    """The module a torch.compile wrapper (`torch.compile(m)`, `torch.compiler.disable(m)`)
    holds, or `module` itself when it is no such wrapper."""
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def wrapper_backend(wrapper: OptimizedModule) -> Any:
    """The dynamo backend a torch.compile wrapper compiles with (mode and options applied),
    or None when it compiles nothing (`torch.compiler.disable`, dynamo's run-only mode)."""
    return _context_backend(wrapper.dynamo_ctx)


def _context_backend(context: Any) -> Any:
    callback = getattr(context, "callback", None)
    if callback is None or callback is False or isinstance(context, DisableContext):
        return None
    backend = callback
    while hasattr(backend, "_torchdynamo_orig_backend"):  # dynamo's frame converters wrap it
        backend = backend._torchdynamo_orig_backend
    return backend


# -- 2. nn.Module.compile() -------------------------------------------------------------------

# What `in_place_compile_backend` returns for a module never compiled in place, and for one
# whose compile wrapper has a shape dcfx does not know (a torch change).
NOT_COMPILED = object()
UNREADABLE = object()


def in_place_compile_backend(module: nn.Module) -> Any:
    """The backend `module.compile(...)` set up: a dynamo backend, None when that compile
    was a no-op (`disable=True`, or `TORCHDYNAMO_DISABLE=1` when it was called),
    `NOT_COMPILED` when `module.compile()` was never called, `UNREADABLE` otherwise."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        return NOT_COMPILED
    # torch.compile returns its argument unchanged when compiling is disabled.
    if getattr(compiled, "__self__", None) is module and getattr(compiled, "__func__", None) is type(module)._call_impl:
        return None
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return _context_backend(value)
    return UNREADABLE


# -- 3. the torch.compile wrapper a call runs inside --------------------------------------------

# Code objects of a module call's frames; in torch 2.13 `OptimizedModule.__call__` runs
# first, then nn.Module's own call frames, all with the wrapper as `self`.
_CALL_CODES = tuple(
    f.__code__
    for f in (OptimizedModule.__call__, nn.Module._wrapped_call_impl, nn.Module._call_impl)
    if hasattr(f, "__code__")
)


def enclosing_compile_wrapper() -> OptimizedModule | None:
    """The innermost torch.compile wrapper whose call is on the calling thread's stack.

    Only this thread's frames are read, so a wrapper running in another thread is never
    found. A module-call frame is recognised by its code object (compared by identity: this
    runs on every call of a dcfx U-Net); only those frames' `self` is looked at.
    """
    first, second, third = (_CALL_CODES + (None, None, None))[:3]
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is first or code is second or code is third:
            owner = frame.f_locals.get("self")
            if isinstance(owner, OptimizedModule):
                return owner
        frame = frame.f_back
    return None


# -- 4. AOTInductor packages ------------------------------------------------------------------

from torch.export.pt2_archive._package import AOTICompiledModel, package_pt2  # noqa: E402


def aoti_metadata(path: str, model: str) -> dict[str, str]:
    """The metadata AOTInductor stored with one model of a package (device, CPU ISA, ...)."""
    return torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, model)


def load_aoti_model(path: str, model: str, device_index: int) -> AOTICompiledModel:
    """One model of a package, without loading its weights (`load_constants` does) and
    without torch's machine check (see item 4)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(path, model, False, 1, device_index)
    return AOTICompiledModel(loader)


# -- 5. torch.export's assertions -------------------------------------------------------------


def export_assert_op() -> Any:
    """The operator torch.export emits to assert a tensor's dtype and device."""
    return torch.ops.aten._assert_tensor_metadata.default


# -- 6. CPU features --------------------------------------------------------------------------

_CPU_EXTRAS = {"AVX512_VNNI": "_is_vnni_supported", "AMX_TILE": "_is_amx_tile_supported"}


def cpu_has(extra: str) -> bool | None:
    """Whether this CPU has `extra` (an AOTInductor ISA name: AVX512_VNNI, AMX_TILE); None
    for a name dcfx cannot check."""
    check = getattr(torch.cpu, _CPU_EXTRAS.get(extra, ""), None)
    return bool(check()) if check is not None else None


# -- 8. a tensor's version counter -------------------------------------------------------------


def tensor_version(x: Any) -> int | None:
    """`x`'s in-place modification counter (host metadata: no device read); None for a
    non-tensor, or an inference tensor (it has none: only its identity counts)."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x._version
    except RuntimeError:
        return None


# -- 9. is a profiler recording ----------------------------------------------------------------


def profiler_enabled() -> bool:
    """Whether a torch profiler is recording now."""
    return torch.autograd._profiler_enabled()


# -- 10. an operator's schema ------------------------------------------------------------------


def writes_first_argument(target: Any) -> bool:
    """Whether `target` (an FX node's target) is an aten overload that writes into its first
    argument in place (`add_`, `copy_`, a slice assignment's `copy_`)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    if not schema.is_mutable or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def out_of_place(target: Any) -> Any:
    """The out-of-place overload of an in-place aten overload (`aten.add_.Tensor` ->
    `aten.add.Tensor`)."""
    name = target._schema.name.split("::")[-1].rstrip("_")
    return getattr(getattr(torch.ops.aten, name), target._overloadname)


# -- 11. export's error logger ------------------------------------------------------------------

# Loggers that report a failed export at error level (one traceback-long record per failure).
EXPORT_ERROR_LOGGERS = ("torch._subclasses.fake_tensor",)


# -- 12. inductor's AOT compile, options and config ----------------------------------------------


def aot_compile(module: nn.Module, inputs: tuple, options: dict[str, Any]) -> list:
    """AOTInductor's files for `module` (an exported module) on these inputs."""
    import torch._inductor

    return torch._inductor.aot_compile(module, inputs, options=options)


def inductor_options() -> list[str]:
    """The names of every inductor option this torch has."""
    import torch._inductor

    return torch._inductor.list_options()


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The inductor options a torch.compile mode stands for."""
    import torch._inductor

    return torch._inductor.list_mode_options(mode)


def inductor_config_patch(changes: dict[str, Any]) -> Any:
    """A context manager that sets these inductor options while it is entered."""
    import torch._inductor.config

    return torch._inductor.config.patch(changes)
