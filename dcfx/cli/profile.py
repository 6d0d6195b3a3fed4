"""`dcfx profile`: where the time of a full and of a shallow step goes, by operator.

Runs a DDIM generation with classifier-free guidance through `dcfx.optimize` under
`torch.profiler`, on a random-weight SD-shaped U-Net (`--size`, SD1.5's widths by default) or
a local diffusers U-Net (`--model PATH`), after an untimed two-step warm-up generation that
captures (and with `--compile` compiles) both graphs. Steps are found by the runtime's
profiler ranges, `dcfx.full[bB]` and `dcfx.shallow[bB]`; for each kind it prints the top
operators by self CPU time (on CUDA: the top kernels by GPU time), averaged over all steps of
that kind, the share of the fused cut op and of the cache copy, and the measured shallow/full
time ratio next to the FLOP ratio from `dcfx.report`. The trace is written as Chrome trace
JSON, which https://ui.perfetto.dev and chrome://tracing open.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import _torch_private as _private
from .._torch_private import pytree
from ..api import optimize
from ..config import DeepCacheConfig
from ..inspection import human_bytes
from ..report import report
from ._model import DTYPES, add_model_arguments, build_model, cut_fields, model_call, native_resolution, parse_device

FUSED_OP = "dcfx::cat_group_norm_silu"
# The fused op's Triton kernels (dcfx.kernels: its own and the statistics kernel), eager or compiled.
FUSED_KERNELS = ("_cat_group_norm_silu", "_group_partial_stats")
CACHE_COPY = "dcfx.cache_copy"
_STEP_RANGE = re.compile(r"^dcfx\.(full|shallow)\[(b\d+|F\d+B\d+)\]$")  # a U-Net's branch, a transformer's cut
# The trace file starts with this (our own key first), so a later run knows the file is ours.
_TRACE_HEAD = '{"otherData":{"producer":"dcfx profile"'
_GUIDANCE = 7.5
_WARMUP_STEPS = 2  # one full and one shallow step: both graphs captured (and compiled)


# -- the profile ----------------------------------------------------------------------------


@dataclass
class StepKind:
    """Profiler time of all steps of one kind ("full" or "shallow"), in microseconds."""

    kind: str
    steps: int = 0
    total_us: float = 0.0  # the ranges' time (CPU wall; on CUDA, GPU time of their kernels)
    # name -> [self time, calls]: operators by self CPU time; on CUDA, kernels by GPU time
    ops: dict[str, list[float]] = field(default_factory=dict)
    fused_us: float = 0.0  # the fused cut op, with what it calls
    copy_us: float = 0.0  # the cache copy (full steps)

    def per_step(self, us: float) -> float:
        return us / self.steps if self.steps else float("nan")


def summarize(events: Any, cuda: bool) -> dict[str, StepKind]:
    """Profiler events attributed to steps by the `dcfx.full[b..]`/`dcfx.shallow[b..]` ranges:
    operators by self CPU time, or on CUDA kernels by GPU time."""
    kinds = {k: StepKind(k) for k in ("full", "shallow")}
    for event in events:
        match = _STEP_RANGE.match(event.name)
        # (On CUDA the ranges also appear on the GPU timeline: the host-side ones count.)
        if match is None or event.device_type != torch.autograd.DeviceType.CPU or _inside_step(event):
            continue
        kind = kinds[match.group(1)]
        kind.steps += 1
        if cuda:
            # By kernel: with compiled graphs the kernels are launched by inductor's wrapper
            # code, not by named operators.
            kind.total_us += event.device_time_total
            for e in (event, *_descendants(event)):
                for kernel in e.kernels:
                    _add(kind.ops, kernel.name, kernel.duration)
                    if kernel.name.startswith(FUSED_KERNELS):
                        kind.fused_us += kernel.duration
                if e.name == CACHE_COPY:
                    kind.copy_us += e.device_time_total
            continue
        kind.total_us += event.cpu_time_total
        _add(kind.ops, f"({match.group(0)} itself: Python, dispatch)", event.self_cpu_time_total)
        for e in _descendants(event):
            _add(kind.ops, e.name, e.self_cpu_time_total)
            if e.name == FUSED_OP:
                kind.fused_us += e.cpu_time_total
            elif e.name == CACHE_COPY:
                kind.copy_us += e.cpu_time_total
    return kinds


def _inside_step(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _STEP_RANGE.match(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def _descendants(event: Any) -> Iterator[Any]:
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def _add(ops: dict[str, list[float]], name: str, us: float) -> None:
    entry = ops.setdefault(name, [0.0, 0])
    entry[0] += us
    entry[1] += 1


def format_kind(kind: StepKind, top: int, cuda: bool, cut: str) -> str:
    """One step kind's table: the top operators (CUDA: kernels) by self time, per step."""
    clock = "GPU time of the kernels launched" if cuda else "CPU time"
    what = "kernel" if cuda else "operator"
    step_us = kind.per_step(kind.total_us)
    lines = [
        f"{kind.kind} steps: {_ms(step_us)} ms per step, averaged over {kind.steps} "
        f"({clock} in the dcfx.{kind.kind}[{cut}] ranges)"
    ]
    ranked = sorted(kind.ops.items(), key=lambda item: -item[1][0])
    shown = [item for item in ranked[:top] if item[1][0] > 0]
    rest = sum(us for _, (us, _) in ranked[len(shown):])
    names = [name if len(name) <= 72 else name[:69] + "..." for name, _ in shown]  # C++ kernel names
    width = max([len(what)] + [len(name) for name in names])
    lines.append(f"  {what.ljust(width)}  calls/step  self ms/step  share")
    for name, (_, (us, calls)) in zip(names, shown):
        lines.append(
            f"  {name.ljust(width)}  {calls / kind.steps:>10.0f}  {_ms(kind.per_step(us)):>12}  {_share(us, kind.total_us):>6}"
        )
    if rest > 0:
        others = f"({len(ranked) - len(shown)} other {what}s)"
        lines.append(f"  {others.ljust(width)}  {'':>10}  {_ms(kind.per_step(rest)):>12}  {_share(rest, kind.total_us):>6}")
    if kind.kind == "shallow":
        if kind.fused_us:
            inner = f"its {'*, '.join(FUSED_KERNELS)}* kernels" if cuda else "with the operators it calls"
            lines.append(
                f"  fused op {FUSED_OP}: {_ms(kind.per_step(kind.fused_us))} ms per step, "
                f"{_share(kind.fused_us, kind.total_us)} of the step ({inner})"
            )
        else:
            lines.append(f"  fused op {FUSED_OP}: not in this graph (fusion off, or no fusable cut)")
    elif kind.copy_us:
        lines.append(
            f"  cache copy {CACHE_COPY}: {_ms(kind.per_step(kind.copy_us))} ms per step, "
            f"{_share(kind.copy_us, kind.total_us)} of the step"
        )
    return "\n".join(lines)


def _ms(us: float) -> str:
    ms = us / 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def check_trace(path: Path, force: bool) -> str | None:
    """Refuses to overwrite a file `dcfx profile` did not write, unless forced."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--trace {path}: the folder {path.parent} does not exist")
    if not path.exists():
        return None
    if path.is_dir():
        raise FileExistsError(f"--trace {path} is a folder: give a file name, e.g. {path / 'dcfx-trace.json'}")
    try:
        with open(path, "rb") as f:
            ours = f.read(len(_TRACE_HEAD)) == _TRACE_HEAD.encode()
    except OSError:
        ours = False
    if ours:
        return f"replaced {path}, written by an earlier dcfx profile"
    if not force:
        raise FileExistsError(f"{path} exists and was not written by dcfx profile: choose another --trace, or pass --force to overwrite it")
    return f"overwrote {path} (--force)"


def write_trace(prof: Any, path: Path, info: dict[str, Any]) -> None:
    """The profiler's Chrome trace, with `info` under the format's `otherData` key, first."""
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        with open(tmp) as f:
            trace = json.load(f)
        other = {"producer": "dcfx profile", **info, **trace.pop("otherData", {})}
        with open(tmp, "w") as f:
            json.dump({"otherData": other, **trace}, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def _generate(unet: nn.Module, call: tuple[tuple, dict, bool], steps: int, mark_steps: bool = False) -> torch.Tensor:
    """A DDIM generation with guidance (a transformer's: flow-matching Euler steps, the sigma
    its timestep); `unet.begin(steps)` marks its start (no host syncs)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    (sample, *_), kwargs, guided = call
    flow = _flow(call)
    scheduler = FlowMatchEulerDiscreteScheduler() if flow else DDIMScheduler()
    scheduler.set_timesteps(steps, device=sample.device)
    x = sample[: sample.shape[0] // 2] if guided else sample.clone()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at unit noise
    unet.begin(steps)
    for i, t in enumerate(scheduler.timesteps):
        with torch.profiler.record_function(f"step {i}") if mark_steps else contextlib.nullcontext():
            if flow:
                sigma = (t / 1000).expand(x.shape[0]).to(x.dtype)
                x = scheduler.step(unet(x, return_dict=False, **{**kwargs, "timestep": sigma})[0], t, x).prev_sample
                continue
            model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            eps = unet(model_input, t, return_dict=False, **kwargs)[0]
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + _GUIDANCE * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
    return x


def _flow(call: tuple[tuple, dict, bool]) -> bool:
    """A transformer's call (the timestep a keyword): sampled by flow matching."""
    return "timestep" in call[1]


def _flop_ratio(unet: nn.Module, call: tuple[tuple, dict, bool], config: DeepCacheConfig, steps: int) -> tuple[float, Any]:
    """shallow/full FLOPs from `dcfx.report`, counted on a meta-device twin (no compute)."""
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config)
    if twin.dtype != unet.dtype:
        twin = twin.to(dtype=unet.dtype)
    twin.eval()
    args, kwargs, _ = call
    meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    rows = {"cuts": [(config.first_blocks, config.last_blocks)]} if config.blocks_given else {"branches": [config.branch]}
    r = report(twin, *pytree.tree_map(meta, args), config=config, num_steps=steps, **rows, **pytree.tree_map(meta, kwargs))
    return r.branches[0].shallow_fraction, r.branches[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "latent height and width (default: the model's, e.g. 64 for sd15; on CPU at most 32)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the profiled generation (default: 10)")
    p.add_argument("--interval", type=int, default=3, help="a full step every INTERVAL steps (default: 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile both graphs (the warm-up compiles)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: %(default)s)")
    p.add_argument("--trace", type=Path, default=Path("dcfx-trace.json"), help="Chrome trace JSON to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --trace even if dcfx profile did not write it")
    p.add_argument("--top", type=int, default=12, help="operators (CUDA: kernels) listed per step kind (default: 12)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def run(args: argparse.Namespace) -> str:
    """Profiles one generation; prints (and returns) the tables, writes the trace."""
    for name in ("steps", "interval", "batch", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
    cut_fields(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device, dtype = parse_device(args.device), DTYPES[args.dtype]
    if device.type == "meta":
        raise ValueError("--device meta computes nothing to profile; use cpu or cuda (dcfx graphs works on meta)")
    note = check_trace(args.trace, args.force)
    cuda = device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if args.compile and not cuda:
            # Name inductor's C++ kernels in the profile (else one opaque call per graph);
            # an inductor setting of torch 2.11-2.13 (part of the compile cache key).
            stack.enter_context(_private.inductor_config_patch({"cpp.enable_kernel_profile": True}))
        return _run(args, device, dtype, note)


def _run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, note: str | None) -> str:
    cuda = device.type == "cuda"
    unet, model_name = build_model(args, device, dtype)
    native = native_resolution(args, unet)
    resolution = args.resolution or (native if cuda else min(native, 32))
    call = model_call(unet, args, resolution, device, dtype)
    fast = optimize(unet, DeepCacheConfig(interval=args.interval, **cut_fields(args), compile=args.compile))
    config = fast.deepcache_config  # a transformer's cut filled in

    start = time.perf_counter()
    _generate(fast, call, min(args.steps, _WARMUP_STEPS))
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    graphs = fast.graphs(*call[0], **call[1])
    cut, label = graphs.cut, graphs.layout.cut.label

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        _generate(fast, call, args.steps, mark_steps=True)
        if cuda:
            torch.cuda.synchronize(device)
        profiled_s = time.perf_counter() - start
    kinds = summarize(prof.events(), cuda)
    flop_ratio, branch_report = _flop_ratio(unet, call, config, args.steps)

    batch = call[0][0].shape[0]
    head = (
        f"dcfx profile: {model_name}, latent {resolution}x{resolution}, model batch {batch}"
        f"{f' ({args.batch} prompt{_s(args.batch)} x guidance)' if call[2] else ''}, {args.steps} "
        f"{'flow-matching Euler' if _flow(call) else 'DDIM'} steps, interval {args.interval}, "
        f"{graphs.layout.cut.describe()}, {'compiled' if args.compile else 'eager'} graphs, "
        f"{args.dtype} on {device}{'' if cuda else f', torch threads {torch.get_num_threads()}'}"
    )
    lines = [
        head,
        f"warm-up ({min(args.steps, _WARMUP_STEPS)} steps: capture{', compile' if args.compile else ''}) "
        f"{warmup_s:.1f} s; profiled generation {profiled_s:.2f} s ({fast.history[-1]}), "
        f"times below are under the profiler (it adds a little per operator)",
        f"cut: {cut.consumer or 'the block after the cached ones'} reads the cached feature ({human_bytes(cut.cached_bytes)} per call slot); "
        f"shallow steps skip {', '.join(cut.skipped_modules)}",
    ]
    for kind in kinds.values():
        if kind.steps:
            lines += ["", format_kind(kind, args.top, cuda, label)]
    full, shallow = kinds["full"], kinds["shallow"]
    lines.append("")
    if full.steps and shallow.steps:
        measured = shallow.per_step(shallow.total_us) / full.per_step(full.total_us)
        lines.append(
            f"shallow/full step time: {measured:.3f} measured ({'GPU' if cuda else 'CPU'} time under the profiler) "
            f"vs {flop_ratio:.3f} in FLOPs (dcfx.report: {branch_report.shallow_flops / 1e9:.3g} of "
            f"{branch_report.full_flops / 1e9:.3g} GFLOPs per call)"
        )
    else:
        lines.append(f"no shallow steps in {args.steps} steps at interval {args.interval}: nothing to compare "
                     f"(FLOP ratio shallow/full {flop_ratio:.3f})")
    write_trace(prof, args.trace, {
        "command": head, "steps": fast.history[-1], "cut": label, "interval": args.interval,
    })
    size_mb = args.trace.stat().st_size / 2**20
    if note:
        lines.append(note)
    lines.append(
        f"trace: {args.trace} ({size_mb:.1f} MiB); open it in https://ui.perfetto.dev or "
        f"chrome://tracing (steps are 'step N' ranges, graphs dcfx.full[{label}] / dcfx.shallow[{label}])"
    )
    text = "\n".join(lines)
    print(text)
    return text
