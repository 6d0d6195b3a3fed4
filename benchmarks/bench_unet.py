"""U-Net generation speed: eager, DeepCache's reference helper, torch.compile and dcfx, in one run.

    python benchmarks/bench_unet.py [--arch sd15 | --model PATH] [--resolution N] [--batch 1]
        [--steps 50] [--interval 3] [--branch 0 ...] [--schedule uniform] [--dtype fp32]
        [--device cuda|cpu] [--variants ...] [--compile-options KEY=VALUE ...] [--repeats 3]
        [--csv PATH] [--md PATH]

e.g. docs/measurements.md's CPU table (SD1.5 architecture at 256px, 10 steps, every CPU variant):

    python benchmarks/bench_unet.py --arch sd15 --resolution 32 --steps 10 --device cpu

The U-Net is SD1.5's architecture with random weights by default (nothing is downloaded);
`--arch sdxl` is SDXL's, `tiny`/`small`/`sdxl-tiny` are for rehearsals, `--model PATH` loads
a local diffusers U-Net (a pipeline folder, its `unet/` folder, or a single-file checkpoint).
A generation is `--steps` DDIM steps with classifier-free guidance (the U-Net sees
2 x `--batch` rows; `--guidance 1` turns CFG off). Variants, in the order a reader meets
the techniques:

  eager                  the diffusers U-Net
  reference              the same U-Net under DeepCache 0.1.1's `DeepCacheSDHelper`
  compile                `torch.compile(unet)` (inductor; `--compile-mode`/`--compile-options`)
  compile-freezing       the same plus inductor's `freezing=True` (the best CPU setting)
  cudagraph              the U-Net captured in one CUDA graph, replayed per step (CUDA)
  reduce-overhead        `torch.compile(unet, mode="reduce-overhead")` (CUDA)
  dcfx                   `dcfx.optimize(unet, ...)`, full and shallow graphs uncompiled
  dcfx-compile           `compile=True` with the compile variant's settings
  dcfx-compile-freezing  `compile=True` with compile-freezing's settings
  dcfx-compile-unfused   dcfx-compile with `fuse_cut=False` (inductor sees the plain cut)
  dcfx-cudagraph         a full and a shallow step captured in CUDA graphs, replayed by the
                         schedule (CUDA)
  dcfx-reduce-overhead   `compile_mode="reduce-overhead"` (CUDA)

Every variant is built from the same U-Net object, which stays unmodified (the reference
helper patches its forwards during its own generations only). `freezing=True` makes inductor
fold (copy and prepack) the weights into each compiled variant: fine for a benchmark, and the
memory column shows it.

Each variant first runs one untimed generation (capture, compile, CUDA-graph capture: its wall
time is the "1st gen" column). Then each repeat runs one generation of every variant in turn,
so that a busy shared machine slows all of them alike; the table gives the median and the
min-max spread over repeats. Speedups divide medians of the same run: over eager, and over
the variant's baseline (the plain variant built the same way: `compile-freezing` for
`dcfx-compile-freezing`, `cudagraph` for `dcfx-cudagraph`, eager for `dcfx` and `reference`).
The FLOP bound is `dcfx.report`'s speedup bound for the schedule (counted on a meta-device
copy of the architecture); "of bound" is the speedup over the baseline divided by it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import platform
import re
import statistics
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

import dcfx
import dcfx.policies
from dcfx.models import random_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCHS = ("sd15", "sdxl", "tiny", "small", "sdxl-tiny")
ARCH_NAMES = {
    "sd15": "SD1.5 architecture",
    "sdxl": "SDXL architecture",
    "tiny": "tiny SD-shaped U-Net",
    "small": "small SD-shaped U-Net",
    "sdxl-tiny": "tiny SDXL-shaped U-Net",
}
# Latent height/width each architecture is made for (SD1.5 512px, SDXL 1024px).
NATIVE_RESOLUTION = {"sd15": 64, "sdxl": 128, "tiny": 16, "small": 16, "sdxl-tiny": 16}

# name -> (what it is, its baseline: the plain variant built the same way).
VARIANTS: dict[str, tuple[str, str | None]] = {
    "eager": ("diffusers U-Net, eager", None),
    "reference": ("DeepCacheSDHelper (DeepCache 0.1.1)", "eager"),
    "compile": ("torch.compile(unet)", "eager"),
    "compile-freezing": ("torch.compile(unet), freezing", "eager"),
    "cudagraph": ("U-Net in one CUDA graph", "eager"),
    "reduce-overhead": ("torch.compile(unet, mode=reduce-overhead)", "eager"),
    "dcfx": ("dcfx graphs, uncompiled", "eager"),
    "dcfx-compile": ("dcfx, compile=True", "compile"),
    "dcfx-compile-freezing": ("dcfx, compile=True, freezing", "compile-freezing"),
    "dcfx-compile-unfused": ("dcfx, compile=True, fuse_cut=False", "compile"),
    "dcfx-cudagraph": ("dcfx full + shallow step in CUDA graphs", "cudagraph"),
    "dcfx-reduce-overhead": ("dcfx, compile_mode=reduce-overhead", "reduce-overhead"),
}
CACHING = {"reference", *(v for v in VARIANTS if v.startswith("dcfx"))}
CUDA_ONLY = {"cudagraph", "reduce-overhead", "dcfx-cudagraph", "dcfx-reduce-overhead"}
FREEZING = {"compile-freezing", "dcfx-compile-freezing"}
COMPILED = {"compile", "compile-freezing", "dcfx-compile", "dcfx-compile-freezing", "dcfx-compile-unfused"}


def default_variants(device: torch.device, schedule: str) -> list[str]:
    """Every variant that runs on `device` (the reference helper only schedules uniformly)."""
    if device.type == "cuda":
        chosen = ["eager", "reference", "compile", "cudagraph", "dcfx", "dcfx-compile", "dcfx-cudagraph"]
    else:
        chosen = [v for v in VARIANTS if v not in CUDA_ONLY and v != "dcfx-compile-unfused"]
    return [v for v in chosen if not (v == "reference" and schedule != "uniform")]


# -- the model and its inputs -------------------------------------------------------------


def build_arch(arch: str) -> UNet2DConditionModel:
    """A random-weight U-Net with the architecture `arch` (one of ARCHS)."""
    if arch not in ("sdxl", "sdxl-tiny"):
        return random_unet(arch)
    full = arch == "sdxl"
    widths = (320, 640, 1280) if full else (32, 64, 64)
    return UNet2DConditionModel(
        sample_size=128 if full else 16,
        block_out_channels=widths,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10) if full else (1, 1, 2),
        attention_head_dim=(5, 10, 20) if full else (4, 8, 8),
        cross_attention_dim=2048 if full else 32,
        norm_num_groups=32 if full else 8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256 if full else 8,
        projection_class_embeddings_input_dim=(2048 + 6 * 256) if full else (32 + 6 * 8),
    ).eval()


def load_model(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """A diffusers U-Net from a pipeline folder, a U-Net folder or a single-file checkpoint."""
    if path.is_file():
        # Single files carry no config: diffusers infers it (and may want the network).
        return UNet2DConditionModel.from_single_file(str(path), torch_dtype=dtype).eval()
    if (path / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).eval()
    if (path / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype).eval()
    raise FileNotFoundError(
        f"--model {path}: expected a diffusers pipeline folder (with unet/config.json), a U-Net "
        "folder (with config.json) or a single-file checkpoint"
    )


def conditioning(config: Any, rows: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random text conditioning (and SDXL's added text/time embeddings) for `rows` rows."""
    cond = {"encoder_hidden_states": torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)}
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text, device=device, dtype=dtype),
            "time_ids": torch.randn(rows, 6, device=device, dtype=dtype),
        }
    elif config.addition_embed_type is not None:
        raise ValueError(
            f"this benchmark conditions U-Nets with addition_embed_type None or 'text_time', "
            f"got {config.addition_embed_type!r}"
        )
    return cond


def flop_bounds(unet: UNet2DConditionModel, args: argparse.Namespace, rows: int, dtype: torch.dtype) -> dict[int, float]:
    """`dcfx.report`'s speedup bound per branch, counted on a meta-device copy (no weights);
    none for an adaptive policy, whose full steps are only known once it ran."""
    if args.adaptive:
        return {}
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config).eval()
        if dtype != torch.float32:
            twin = twin.to(dtype)
        x = torch.randn(rows, unet.config.in_channels, args.resolution, args.resolution, dtype=dtype)
        t = torch.tensor(999)
        cond = conditioning(unet.config, rows, torch.device("meta"), dtype)
    report = dcfx.report(
        twin, x, t, config=dcfx_config(args), num_steps=args.steps, branches=args.branch, **cond
    )
    return {r.branch: r.speedup_bound for r in report.branches}


def dcfx_config(args: argparse.Namespace, branch: int = 0, **compile_settings: Any) -> dcfx.DeepCacheConfig:
    return dcfx.DeepCacheConfig(
        interval=args.interval, branch=branch, schedule=args.schedule, center=args.center,
        power=args.power, adaptive=args.adaptive, threshold=args.threshold, forecast=args.forecast,
        **compile_settings,
    )


# -- variants -------------------------------------------------------------------------------


class _Reference:
    """The U-Net under DeepCacheSDHelper, enabled for one generation at a time."""

    def __init__(self, unet: torch.nn.Module, scheduler: DDIMScheduler, interval: int, branch: int):
        from DeepCache.extension.deepcache import DeepCacheSDHelper

        self.unet = unet
        self.helper = DeepCacheSDHelper(types.SimpleNamespace(unet=unet, scheduler=scheduler))
        self.helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def generation(self, run: Callable[[Any], Any]) -> Any:
        self.helper.enable()
        try:
            return run(self.unet)
        finally:
            self.helper.disable()
            # disable() leaves the original forwards as instance attributes: drop them so the
            # U-Net is as built for the other variants (and for torch.compile's guards).
            for module in self.unet.modules():
                module.__dict__.pop("forward", None)


class _Replayed:
    """CUDA graphs captured once and replayed per step.

    For a DeepCacheUNet: `dcfx.cuda_graphs` (the recipe of docs/cuda-graphs.md), which replays the graph its
    policy picks per step; for the plain U-Net: one graph of one call. Inputs are copied into
    the captured input tensors.
    """

    def __init__(self, unet: Any, x: torch.Tensor, t: torch.Tensor, cond: dict, num_steps: int):
        self.x, self.t = x.clone(), t.clone()
        self.step, self.num_steps = 0, num_steps
        if isinstance(unet, dcfx.DeepCacheUNet):
            self.graphs = dcfx.cuda_graphs(unet, self.x, self.t, **cond)
            return
        self.graphs = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: let the allocator settle before capture
            for _ in range(2):
                unet(self.x, self.t, **cond)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = unet(self.x, self.t, **cond).sample

    def begin(self, num_steps: int) -> None:
        self.step, self.num_steps = 0, num_steps

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> Any:
        self.x.copy_(x)
        self.t.copy_(t)
        if self.graphs is not None:
            out = self.graphs.step(self.step, self.num_steps)
        else:
            self.graph.replay()
            out = types.SimpleNamespace(sample=self.out)
        self.step += 1
        return out


def compile_settings(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """torch.compile's mode/options for a compiled variant (the same for a plain one and dcfx's)."""
    if variant.endswith("reduce-overhead"):
        return {"mode": "reduce-overhead", "options": None}
    options = dict(args.compile_options)
    if variant in FREEZING:
        options["freezing"] = True
    return {"mode": args.compile_mode, "options": options or None}


def make_variant(
    variant: str, unet: torch.nn.Module, args: argparse.Namespace, branch: int | None,
    scheduler: DDIMScheduler, x: torch.Tensor, t: torch.Tensor, cond: dict,
) -> Any:
    """The callable U-Net of a variant (a _Reference for the helper). `unet` is not changed."""
    if variant == "eager":
        return unet
    if variant == "reference":
        return _Reference(unet, scheduler, args.interval, branch)
    if variant == "cudagraph":
        return _Replayed(unet, x, t, cond, args.steps)
    if variant in ("compile", "compile-freezing", "reduce-overhead"):
        return torch.compile(unet, fullgraph=True, dynamic=False, **compile_settings(variant, args))
    settings: dict[str, Any] = {}
    if variant in COMPILED or variant == "dcfx-reduce-overhead":
        mode_options = compile_settings(variant, args)
        settings = dict(compile=True, compile_mode=mode_options["mode"], compile_options=mode_options["options"] or {})
    if variant == "dcfx-compile-unfused":
        settings["fuse_cut"] = False
    fast = dcfx.optimize(unet, dcfx_config(args, branch, **settings))
    return _Replayed(fast, x, t, cond, args.steps) if variant == "dcfx-cudagraph" else fast


# -- measuring ------------------------------------------------------------------------------


class _PeakMemory:
    """Memory a generation adds at its peak over what was allocated before it, in bytes.

    CUDA: `max_memory_allocated` (reset on entry) minus `memory_allocated` on entry. CPU: the
    process's resident set (/proc/self/statm), sampled every `interval` seconds by a thread,
    minus the RSS on entry; None where /proc is missing. RSS-based: freed memory the allocator
    keeps hides later growth, and peaks shorter than the interval can be missed.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._high = max(self._high, self.rss() or 0)

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        self._before = self.rss()
        if self._before is not None:
            self._high = self._before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, self.rss() or 0) - self._before


def generation(
    runner: Any, scheduler: DDIMScheduler, latents: torch.Tensor, cond: dict, args: argparse.Namespace,
    device: torch.device, mark_steps: bool = False,
) -> tuple[float, torch.Tensor]:
    """Seconds for one generation of `args.steps` DDIM steps, and its final latents.

    `mark_steps`: tell inductor's CUDA graphs (mode="reduce-overhead") that each U-Net call is
    a new step, as inference loops must (the last step's outputs are still referenced).
    """
    scheduler.set_timesteps(args.steps, device=device)
    cfg = args.guidance > 1

    def loop(unet: Any) -> tuple[float, torch.Tensor]:
        if hasattr(unet, "begin"):
            unet.begin(args.steps)  # sync-free generation boundary (dcfx, replayed graphs)
        x = latents
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            eps = unet(torch.cat([x] * 2) if cfg else x, t, **cond).sample
            if cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + args.guidance * (eps_text - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, x

    if isinstance(runner, _Reference):
        return runner.generation(loop)
    return loop(runner)


@dataclass
class Row:
    """One (variant, branch): its measurements, filled in as the run goes."""

    variant: str
    branch: int | None
    runner: Any = None
    first_s: float = float("nan")
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None
    recompiles: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 where torch hides it)."""
    try:
        from torch._dynamo.utils import counters  # private; checked on torch 2.13

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return 0


# -- output -----------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cores = os.cpu_count()
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores} CPU cores"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    return f"{name}, {cores} cores ({torch.get_num_threads()} torch threads)"


def versions() -> str:
    import diffusers

    parts = [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    parts.append(f"dcfx {dcfx.__version__}")
    return ", ".join(parts)


def heading(args: argparse.Namespace, device: torch.device, model: str, rows: int) -> list[str]:
    compile_desc = "inductor default" if not (args.compile_mode or args.compile_options) else (
        f"inductor mode={args.compile_mode}" if args.compile_mode else
        "inductor " + ", ".join(f"{k}={v!r}" for k, v in args.compile_options.items())
    )
    schedule = args.schedule + (f" (center {args.center}, power {args.power})" if args.schedule == "nonuniform" else "")
    policy = f"N={args.interval}, {{b}}, {schedule} schedule"
    if args.adaptive:
        threshold = args.threshold if args.threshold is not None else dcfx.policies.DEFAULT_THRESHOLDS[args.adaptive]
        policy = f"adaptive '{args.adaptive}' (threshold {threshold}), {{b}}"
    if args.forecast:
        policy += f", forecast order {args.forecast}"
    pixels = 8 * args.resolution
    cfg = f"batch {args.batch} x 2 (CFG) = {rows}" if args.guidance > 1 else f"batch {rows} (no CFG)"
    return [
        f"{model}, {pixels}x{pixels} (latent {args.resolution}x{args.resolution}), {cfg}, {args.dtype}, "
        f"{args.steps} DDIM steps; DeepCache " + policy.format(b=f"b={','.join(map(str, args.branch))}"),
        f"{machine(device)}; {versions()}; compiled variants: {compile_desc}; "
        f"median and min-max of {args.repeats} interleaved repeats",
    ]


def _anchor(row: Row, rows: dict[tuple[str, int | None], Row]) -> Row | None:
    """The run whose final latents `row` should reproduce: eager for plain variants, the
    reference helper (else uncompiled dcfx) at the same branch for DeepCache variants."""
    if row.variant not in CACHING:
        return rows.get(("eager", None))
    return rows.get(("reference", row.branch)) or rows.get(("dcfx", row.branch))


def table_rows(rows: list[Row], bounds: dict[int, float]) -> list[dict[str, Any]]:
    """The numbers per (variant, branch), as CSV fields."""
    medians = {r.variant: r.median for r in rows if r.branch is None}
    by_key = {(r.variant, r.branch): r for r in rows}
    out = []
    for r in rows:
        base = VARIANTS[r.variant][1]
        vs_eager = medians["eager"] / r.median if "eager" in medians and r.variant != "eager" else None
        vs_base = medians[base] / r.median if base in medians else None
        bound = bounds.get(r.branch) if r.variant in CACHING else None
        anchor = _anchor(r, by_key)
        err = None
        if anchor is not None and anchor is not r:
            a, b = anchor.latents.float(), r.latents.float()
            err = ((b - a).norm() / a.norm()).item()
        out.append({
            "variant": r.variant,
            "branch": "" if r.branch is None else r.branch,
            "median_s": r.median,
            "min_s": min(r.times),
            "max_s": max(r.times),
            "times_s": " ".join(f"{s:.4f}" for s in r.times),
            "vs_eager": vs_eager,
            "baseline": base or "",
            "vs_baseline": vs_base,
            "flop_bound": bound,
            "of_bound": vs_base / bound if vs_base is not None and bound else None,
            "peak_mib": max(r.peaks) / 2**20 if r.peaks else None,
            "first_gen_s": r.first_s,
            "rel_err_vs": anchor.variant if anchor is not None and anchor is not r else "",
            "rel_err": err,
            "recompiles": r.recompiles,
        })
    return out


def markdown(head: list[str], fields: list[dict[str, Any]], device: torch.device) -> str:
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"**{head[0]}**", "", head[1], ""]
    lines.append(
        "| variant | what | b | s/gen | min-max | vs eager | vs baseline | FLOP bound | of bound "
        "| peak MiB | 1st gen s | rel. err |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for f in fields:
        base = f"{x(f['vs_baseline'])} ({f['baseline']})" if f["vs_baseline"] is not None else "-"
        err = f"{f['rel_err']:.1e} ({f['rel_err_vs']})" if f["rel_err"] is not None else "-"
        name = f["variant"] + (f" ({f['recompiles']} recompiles while timed)" if f["recompiles"] else "")
        cells = [
            name, VARIANTS[f["variant"]][0], "-" if f["branch"] == "" else str(f["branch"]),
            f"{f['median_s']:.3f}", f"{f['min_s']:.3f}-{f['max_s']:.3f}", x(f["vs_eager"]), base,
            x(f["flop_bound"]), pct(f["of_bound"]), num(f["peak_mib"], ".0f"), f"{f['first_gen_s']:.1f}", err,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    memory = (
        "CUDA memory allocated at the peak of a generation over what was allocated before it"
        if device.type == "cuda" else
        "RSS-based: the process's resident-set growth at the peak of a generation over its RSS "
        "before it (sampled every 5 ms)"
    )
    lines += [
        "",
        "s/gen: median seconds per generation. vs baseline: over the plain variant built the same "
        "way. FLOP bound: dcfx.report's speedup bound for the schedule; of bound: vs baseline / "
        f"FLOP bound. peak MiB: {memory}, the largest over the variant's generations (the first "
        "included, so compiled weights and caches count). 1st gen: the untimed first generation "
        "(capture, compile). rel. err: final latents against those of the variant named (random "
        "weights: a check that the variant computes what it should, not a quality measure).",
    ]
    return "\n".join(lines) + "\n"


def default_output(args: argparse.Namespace, device: torch.device, suffix: str) -> Path:
    """benchmarks/results/unet_<settings><suffix>. A run with other columns or other compile
    settings than the full default run gets a name of its own (the variants it ran, the
    compile mode or options), so it never replaces a full table."""
    model = Path(args.model).stem if args.model else args.arch
    name = (
        f"unet_{model}_{device.type}_{args.dtype}_{args.resolution}x{args.resolution}_b{args.batch}_"
        f"{args.steps}steps_N{args.interval}_b{'-'.join(map(str, args.branch))}_{args.schedule}"
        f"{f'_adaptive-{args.adaptive}' if args.adaptive else ''}{f'_forecast{args.forecast}' if args.forecast else ''}"
    )
    if args.variants_given:
        name += "_" + "+".join(args.variants)
    if args.compile_mode:
        name += f"_mode={args.compile_mode}"
    name += "".join(f"_{key}={value}" for key, value in sorted(args.compile_options.items()))
    return Path(__file__).parent / "results" / (name + suffix)


# -- main -------------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value as a Python literal, else as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an inductor option), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--arch", choices=ARCHS, default="sd15", help="random-weight architecture (default sd15)")
    model.add_argument("--model", type=Path, help="a local diffusers U-Net or pipeline folder, or a single-file checkpoint")
    p.add_argument("--resolution", type=int, help="latent height and width (image size / 8); default: the model's native size")
    p.add_argument("--batch", type=int, default=1, help="images per generation (CFG doubles the U-Net's batch)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per generation")
    p.add_argument("--interval", type=int, default=3, help="DeepCache N")
    p.add_argument("--branch", type=int, nargs="+", default=[0], help="DeepCache branch(es) b; each is its own row")
    p.add_argument("--schedule", choices=("uniform", "nonuniform"), default="uniform")
    p.add_argument("--center", type=int, default=15, help="non-uniform schedule's centre step")
    p.add_argument("--power", type=float, default=1.4, help="non-uniform schedule's power")
    p.add_argument("--adaptive", choices=("cut", "accumulated", "latent"),
                   help="dcfx variants gate each step on this signal (random weights: times the mechanics only)")
    p.add_argument("--threshold", type=float, help="the adaptive signal's threshold (default: the signal's)")
    p.add_argument("--forecast", type=int, choices=(0, 1, 2), default=0, help="dcfx variants extrapolate the deep feature")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"some of {', '.join(VARIANTS)} (default: all but dcfx-compile-unfused that run on the device)")
    p.add_argument("--compile-mode", help="torch.compile mode for the compiled variants (not with --compile-options)")
    p.add_argument("--compile-options", nargs="+", type=_option, default=[], metavar="KEY=VALUE",
                   help="inductor options for the compiled variants (the -freezing ones add freezing=True)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, help="default: benchmarks/results/unet_<settings>.csv, where the settings "
                   "name --variants and the compile mode or options when given")
    p.add_argument("--md", type=Path, help="default: benchmarks/results/unet_<settings>.md (as --csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    args.compile_options = dict(args.compile_options)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    for name in ("batch", "steps", "interval", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 1:
        p.error(f"--resolution must be >= 1, got {args.resolution}")
    if any(b < 0 for b in args.branch):
        p.error(f"--branch must be >= 0, got {args.branch}")
    if args.compile_mode and args.compile_options:
        p.error("torch.compile takes either --compile-mode or --compile-options, not both")
    args.variants_given = args.variants is not None
    variants = args.variants or default_variants(device, args.schedule)
    bad = [v for v in variants if v in CUDA_ONLY and device.type != "cuda"]
    if bad:
        cpu = ", ".join(v for v in VARIANTS if v not in CUDA_ONLY)
        p.error(f"CUDA-only variant(s) {', '.join(bad)} need --device cuda (variants on {device.type}: {cpu})")
    if args.adaptive or args.forecast:
        if args.variants and "reference" in args.variants:
            p.error("the reference helper has no adaptive or forecast policy: drop 'reference'")
        variants = [v for v in variants if v != "reference"]
    if "reference" in variants and args.schedule != "uniform":
        p.error("the reference helper schedules only uniformly: drop 'reference' or use --schedule uniform")
    if args.compile_mode and set(variants) & FREEZING:
        p.error("the -freezing variants set inductor options, which torch.compile refuses with --compile-mode")
    args.variants = [v for v in VARIANTS if v in variants]  # progressive order, no duplicates
    args.branch = sorted(set(args.branch))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model:
        unet = load_model(args.model, dtype).to(device)
        model_name = f"U-Net from {args.model}"
    else:
        with torch.device(device):  # SDXL's 2.6B parameters initialise slowly on a CPU
            unet = build_arch(args.arch)
        if dtype != torch.float32:
            unet = unet.to(dtype)
        model_name = f"{ARCH_NAMES[args.arch]} (random weights)"
    if args.resolution is None:
        args.resolution = NATIVE_RESOLUTION.get(args.arch, unet.config.sample_size) if not args.model else unet.config.sample_size
    rows = args.batch * (2 if args.guidance > 1 else 1)
    latents = torch.randn(args.batch, unet.config.in_channels, args.resolution, args.resolution, device=device, dtype=dtype)
    cond = conditioning(unet.config, rows, device, dtype)
    x0 = torch.cat([latents] * (rows // args.batch))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    scheduler.set_timesteps(args.steps, device=device)
    t0 = scheduler.timesteps[0].clone()  # the scheduler's dtype, as the CUDA-graph variants need
    head = heading(args, device, model_name, rows)
    print(head[0], head[1], sep="\n", flush=True)

    bounds = flop_bounds(unet, args, rows, dtype) if set(args.variants) & CACHING else {}
    table = [
        Row(v, b) for v in args.variants for b in (args.branch if v in CACHING else [None])
    ]
    bar = tqdm(total=len(table) * (1 + args.repeats), unit="gen", disable=args.no_progress, dynamic_ncols=True)

    def run(row: Row) -> tuple[float, torch.Tensor]:
        bar.set_description(f"{row.variant}{'' if row.branch is None else f' b={row.branch}'}")
        with _PeakMemory(device) as memory:
            seconds, final = generation(
                row.runner, scheduler, latents, cond, args, device, mark_steps=row.variant.endswith("reduce-overhead")
            )
        if memory.peak is not None:
            row.peaks.append(memory.peak)
        bar.update()
        return seconds, final

    with torch.no_grad():
        for row in table:
            start = time.perf_counter()
            row.runner = make_variant(row.variant, unet, args, row.branch, scheduler, x0, t0, cond)
            _, row.latents = run(row)  # capture, compile, warm-up
            row.first_s = time.perf_counter() - start
        for _ in range(args.repeats):
            for row in table:
                compiled = _compiled_graphs()
                row.times.append(run(row)[0])
                row.recompiles += _compiled_graphs() - compiled
    bar.close()

    fields = table_rows(table, bounds)
    text = markdown(head, fields, device)
    print("\n" + text)
    csv_path = args.csv or default_output(args, device, ".csv")
    md_path = args.md or default_output(args, device, ".md")
    for path in (csv_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    settings = {
        "model": str(args.model) if args.model else args.arch, "device": device.type, "dtype": args.dtype,
        "resolution": args.resolution, "batch": args.batch, "unet_batch": rows, "steps": args.steps,
        "interval": args.interval, "schedule": args.schedule,
    }
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*settings, *fields[0]])
        writer.writeheader()
        for row in fields:
            writer.writerow({**settings, **{k: ("" if v is None else v) for k, v in row.items()}})
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
