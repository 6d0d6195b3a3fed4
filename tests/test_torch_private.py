"""Every private torch API dcfx uses (dcfx/_torch_private.py), one test per item.

A failure here means the installed torch changed that item: the message names it and what
dcfx needs from it, so the fix goes into dcfx/_torch_private.py. Item 4's loader is also run
end to end by tests/test_package.py (an AOT compile, slower).
"""

from __future__ import annotations

import inspect
import threading

import torch
from torch import nn

from dcfx import _torch_private as private


def broken(item: str, what: str) -> str:
    return f"torch {torch.__version__} changed item {item} of dcfx/_torch_private.py: {what}"


class Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


def compiles_with(backend, recorder: Recorder) -> bool:
    before = recorder.calls
    torch._dynamo.reset()
    torch.compile(lambda x: x * 3 - 1, backend=backend)(torch.ones(3))
    return recorder.calls > before


def test_item_1_compile_wrapper():
    module, recorder = nn.Linear(2, 2), Recorder()
    wrapper = torch.compile(module, backend=recorder)
    assert private.unwrap_compiled(wrapper) is module, broken("1", "torch.compile(m)._orig_mod is not m")
    assert private.unwrap_compiled(module) is module
    backend = private.wrapper_backend(wrapper)
    assert backend is not None and compiles_with(backend, recorder), broken(
        "1", "the backend read from dynamo_ctx.callback (through _torchdynamo_orig_backend) is not the one given"
    )
    disabled = torch.compiler.disable(module)
    assert private.unwrap_compiled(disabled) is module and private.wrapper_backend(disabled) is None, broken(
        "1", "torch.compiler.disable(m) is no OptimizedModule with a DisableContext"
    )
    options = private.wrapper_backend(torch.compile(module, options={"epilogue_fusion": False}))
    assert getattr(options, "config", None) == {"epilogue_fusion": False}, broken(
        "1", "an inductor wrapper's options are not its backend's .config (dcfx's messages show them)"
    )


def test_item_2_module_compile(monkeypatch):
    recorder = Recorder()
    module = nn.Linear(2, 2)
    assert private.in_place_compile_backend(module) is private.NOT_COMPILED
    module.compile(backend=recorder)
    backend = private.in_place_compile_backend(module)
    assert backend is not private.UNREADABLE, broken(
        "2", "module.compile() no longer keeps a dynamo context in _compiled_call_impl's closure"
    )
    assert compiles_with(backend, recorder), broken("2", "module.compile()'s backend is not the one given")
    module.compile(disable=True)
    assert private.in_place_compile_backend(module) is None, broken(
        "2", "module.compile(disable=True) no longer sets _compiled_call_impl to the module's own _call_impl"
    )
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    module = nn.Linear(2, 2)
    module.compile(backend=recorder)
    assert private.in_place_compile_backend(module) is None, broken(
        "2", "under TORCHDYNAMO_DISABLE=1, module.compile() is no longer a no-op"
    )


class Probe(nn.Module):
    """Reports the torch.compile wrapper its call runs inside, from dynamo-disabled code (as
    dcfx's module runs)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    @torch.compiler.disable
    def forward(self, x):
        self.seen.append(private.enclosing_compile_wrapper())
        return x


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1


def test_item_3_enclosing_wrapper():
    probe = Probe()
    wrapper = torch.compile(probe, backend=Recorder())
    outer = torch.compile(Outer(probe), backend=Recorder())
    disabled = torch.compiler.disable(probe)
    x = torch.ones(2)
    probe(x)
    wrapper(x)
    outer(x)
    disabled(x)
    assert probe.seen == [None, wrapper, outer, disabled], broken(
        "3", "a torch.compile wrapper's call no longer runs in a module-call frame with the wrapper as `self` "
        f"(found {probe.seen})"
    )

    # Another thread inside a wrapper is not this thread's wrapper.
    inside, done = threading.Event(), threading.Event()

    class Hold(nn.Module):
        @torch.compiler.disable
        def forward(self, x):
            inside.set()
            done.wait(60)
            return x

    held = torch.compile(Hold(), backend=Recorder())
    thread = threading.Thread(target=held, args=(x,))
    thread.start()
    try:
        assert inside.wait(60)
        probe(x)
    finally:
        done.set()
        thread.join(60)
    assert probe.seen[-1] is None, broken("3", "a wrapper running in another thread was found")


def test_item_4_aoti_package_loader_and_packager():
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    assert loader is not None and hasattr(loader, "load_metadata_from_package"), broken(
        "4", "torch._C._aoti.AOTIModelPackageLoader (or its load_metadata_from_package) is gone"
    )
    model = inspect.signature(private.AOTICompiledModel)
    assert list(model.parameters) == ["loader"], broken("4", f"AOTICompiledModel{model} takes more than the loader")
    constants = inspect.signature(private.AOTICompiledModel.load_constants).parameters
    assert {"constants_map", "check_full_update", "user_managed"} <= set(constants), broken(
        "4", f"AOTICompiledModel.load_constants takes {list(constants)}"
    )
    packager = inspect.signature(private.package_pt2).parameters
    assert {"aoti_files", "extra_files"} <= set(packager), broken("4", f"package_pt2 takes {list(packager)}")


def test_item_5_export_assertion_op():
    class Add(nn.Module):
        def forward(self, x):
            return x.to(torch.float32) + 1

    op = private.export_assert_op()
    graph = torch.export.export(Add(), (torch.ones(2, dtype=torch.float64),), strict=False).module().graph
    emitted = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert graph.find_nodes(op="call_function", target=op), broken(
        "5", f"torch.export no longer emits {op} for a dtype cast (it emits {sorted(emitted)}); dcfx removes "
        "export's assertions so that they do not keep the deep path alive in the shallow graph"
    )


def test_item_6_cpu_feature_checks():
    for extra in ("AVX512_VNNI", "AMX_TILE"):
        assert isinstance(private.cpu_has(extra), bool), broken("6", f"torch.cpu has no check for {extra}")
    assert private.cpu_has("NOT_AN_ISA") is None


def test_item_7_pytree():
    spec = private.pytree.tree_flatten({"a": (torch.ones(1), 2)})[1]
    names = ("tree_unflatten", "tree_leaves", "tree_flatten_with_path", "keystr", "treespec_dumps",
             "treespec_loads", "SERIALIZED_TYPE_TO_PYTHON_TYPE", "TreeSpec")
    missing = [n for n in names if not hasattr(private.pytree, n)]
    assert not missing, broken("7", f"torch.utils._pytree lacks {missing}")
    assert private.pytree.treespec_loads(private.pytree.treespec_dumps(spec)) == spec, broken(
        "7", "a tree spec no longer survives treespec_dumps/treespec_loads"
    )


def test_item_8_tensor_version():
    x = torch.zeros(3)
    before = private.tensor_version(x)
    x.add_(1)
    assert isinstance(before, int) and private.tensor_version(x) == before + 1, broken(
        "8", "Tensor._version no longer counts in-place writes"
    )
    with torch.inference_mode():
        y = torch.zeros(1)
    assert private.tensor_version(y) is None and private.tensor_version(3) is None


def test_item_9_profiler_enabled():
    assert private.profiler_enabled() is False, broken("9", "torch.autograd._profiler_enabled is True with no profiler")
    with torch.profiler.profile():
        assert private.profiler_enabled() is True, broken("9", "torch.autograd._profiler_enabled misses a running profiler")


def test_item_10_operator_schema():
    aten = torch.ops.aten
    assert private.writes_first_argument(aten.add_.Tensor) and private.writes_first_argument(aten.copy_.default), broken(
        "10", "torch._ops.OpOverload._schema no longer marks in-place writes into the first argument"
    )
    assert not private.writes_first_argument(aten.add.Tensor) and not private.writes_first_argument(torch.add)
    assert not private.writes_first_argument(aten.slice_scatter.default)
    assert private.out_of_place(aten.add_.Tensor) is aten.add.Tensor and private.out_of_place(aten.mul_.Scalar) is aten.mul.Scalar, broken(
        "10", "an in-place overload's schema name or overload name no longer leads to its out-of-place twin"
    )


def test_item_11_export_error_logger():
    import importlib
    import logging

    for name in private.EXPORT_ERROR_LOGGERS:
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "log", None), logging.Logger) and module.log.name == name, broken(
            "11", f"{name} no longer logs through a logger of its own name (capture holds back its records)"
        )


def test_item_12_inductor_aot_compile_options_and_config():
    import torch._inductor.config as inductor_config

    assert "aot_inductor.package_constants_on_disk_format" in private.inductor_options(), broken(
        "12", "torch._inductor.list_options() lacks AOTInductor's on-disk weights option"
    )
    assert private.inductor_mode_options("reduce-overhead").get("triton.cudagraphs") is True, broken(
        "12", "torch._inductor.list_mode_options('reduce-overhead') no longer names inductor's CUDA graphs"
    )
    before = inductor_config.cpp.enable_kernel_profile
    with private.inductor_config_patch({"cpp.enable_kernel_profile": not before}):
        assert inductor_config.cpp.enable_kernel_profile is (not before), broken("12", "torch._inductor.config.patch sets nothing")
    assert inductor_config.cpp.enable_kernel_profile is before
    parameters = inspect.signature(torch._inductor.aot_compile).parameters
    assert list(parameters)[:2] == ["gm", "args"] and "options" in parameters, broken(
        "12", f"torch._inductor.aot_compile takes {list(parameters)} (dcfx passes a module, its inputs and options=)"
    )
