"""Shared code of bench_dit_cache.py: the Flux-shaped models, a flow-matching Euler loop, the
cache variants (diffusers' hooks and dcfx) and their measurement under one protocol.

Every variant runs the same loop from the same noise: one transformer call per step (with
guidance the conditional and unconditional halves are one batch), sigmas evenly from 1 to 0,
`x += (sigma_next - sigma) * v`. Each call is made under `transformer.cache_context("cond")`,
which diffusers' hooks need; dcfx starts each generation with `begin(steps)`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn


@dataclasses.dataclass
class Setup:
    """A transformer and the fixed inputs of one generation."""

    transformer: nn.Module
    noise: torch.Tensor  # (B, image tokens, channels)
    conditions: dict[str, torch.Tensor]  # the call's other tensors, fixed over the loop
    steps: int
    guidance: float = 1.0  # > 1: the batch's second half is unconditional


def flux_config(width: int, image_channels: int, text_dim: int, pooled_dim: int, double: int, single: int) -> dict:
    """A FluxTransformer2DModel config of `width` = heads x head size: Flux's heads of 128
    from 128 up, heads of 32 below; the rotary axes split a head as Flux does (1/8, 7/16, 7/16)."""
    head = 128 if width >= 128 else 32
    if width % head:
        raise ValueError(f"width must be a multiple of {head}, got {width}")
    return dict(patch_size=1, in_channels=image_channels, num_layers=double, num_single_layers=single,
                attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=text_dim,
                pooled_projection_dim=pooled_dim, guidance_embeds=False,
                axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16))


def random_flux(config: dict, image_tokens: int, text_tokens: int, steps: int, batch: int = 1,
                dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Setup:
    """A random-weight FluxTransformer2DModel with random text conditions on a square token grid."""
    from diffusers import FluxTransformer2DModel

    side = int(image_tokens ** 0.5)
    if side * side != image_tokens:
        raise ValueError(f"image tokens must be a square number, got {image_tokens}")
    with torch.random.fork_rng(devices=[]), torch.device(device):  # built in place: Flux's width is 1.2e9 weights
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**config).eval().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    conditions = dict(
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    noise = torch.randn(batch, image_tokens, config["in_channels"], generator=g)
    return Setup(transformer, noise.to(device, dtype), {k: v.to(device, dtype) for k, v in conditions.items()}, steps)


def flux_digits(steps: int, labels: int = 4, seed: int = 0) -> Setup:
    """The trained Flux-shaped digits model at its guidance scale, labels 0..labels-1."""
    import dcfx.models
    from dcfx.models.flux_digits import DEFAULT_GUIDANCE_SCALE, RESOLUTION, image_ids, pack, text_ids

    pipe = dcfx.models.flux_digits()
    embedding = pipe.label_embedding
    classes = torch.cat([torch.arange(labels), torch.full((labels,), embedding.null_label)])
    with torch.no_grad():
        conditions = dict(encoder_hidden_states=embedding(classes), pooled_projections=embedding.pooled(classes),
                          img_ids=image_ids(RESOLUTION, RESOLUTION), txt_ids=text_ids(embedding.config.tokens_per_class))
    channels = pipe.transformer.config.in_channels // 4
    noise = torch.randn(labels, channels, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))
    return Setup(pipe.transformer, pack(noise), conditions, steps, DEFAULT_GUIDANCE_SCALE)


class Loop:
    """The Euler loop of a Setup, around any callable with the transformer's signature."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.sigmas = torch.linspace(1.0, 0.0, setup.steps + 1).tolist()
        batch = setup.conditions["encoder_hidden_states"].shape[0]
        self.timesteps = [torch.full((batch,), s, dtype=setup.noise.dtype, device=setup.noise.device) for s in self.sigmas]

    def velocity(self, v: torch.Tensor) -> torch.Tensor:
        if self.setup.guidance <= 1.0:
            return v
        cond, uncond = v.chunk(2)
        return uncond + self.setup.guidance * (cond - uncond)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.setup.guidance > 1.0 else x

    def run(self, model: Callable) -> torch.Tensor:
        """One generation with `model`; returns the final latent."""
        s, x = self.setup, self.setup.noise.clone()
        if hasattr(model, "begin"):
            model.begin(s.steps)
        with torch.no_grad(), s.transformer.cache_context("cond"):
            for i in range(s.steps):
                out = model(hidden_states=self.batch(x), timestep=self.timesteps[i], return_dict=False, **s.conditions)[0]
                x = x + (self.sigmas[i + 1] - self.sigmas[i]) * self.velocity(out)
        return x

    def run_captured(self, graphs_of: Callable) -> Callable[[], torch.Tensor]:
        """A generation replayed by `dcfx.cuda_graphs` (`graphs_of(**call)` captures at the first
        generation, so that a failing capture fails the row)."""
        s = self.setup
        x_in, t_in = self.batch(s.noise).clone(), self.timesteps[0].clone()
        captured = []

        def run() -> torch.Tensor:
            if not captured:
                captured.append(graphs_of(hidden_states=x_in, timestep=t_in, **s.conditions))
            x = s.noise.clone()
            with torch.no_grad():
                for i in range(s.steps):
                    x_in.copy_(self.batch(x))
                    t_in.copy_(self.timesteps[i])
                    out = captured[0].step(i, s.steps)[0]
                    x = x + (self.sigmas[i + 1] - self.sigmas[i]) * self.velocity(out)
            return x

        return run


class FullStepCounter:
    """Counts the full steps a diffusers cache hook decides on, by wrapping the hook's decision
    method (host code under `torch.compiler.disable`, so it runs in Python under compile too)."""

    DECISIONS = ("_should_compute_remaining_blocks", "_measure_should_compute")  # FirstBlockCache, TaylorSeer

    def __init__(self, transformer: nn.Module):
        self.full = self.steps = 0
        hook, method = self._first_decider(transformer)
        decide = getattr(hook, method)

        @torch.compiler.disable
        def counted(*args: Any, **kwargs: Any) -> Any:
            result = decide(*args, **kwargs)
            self.steps += 1
            self.full += bool(result[0] if isinstance(result, tuple) else result)
            return result

        setattr(hook, method, counted)

    def _first_decider(self, transformer: nn.Module) -> tuple[Any, str]:
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in getattr(registry, "hooks", {}).values():
                for method in self.DECISIONS:
                    if hasattr(hook, method):
                        return hook, method
        raise ValueError("no FirstBlockCache or TaylorSeer hook on this transformer")

    def reset(self) -> None:
        self.full = self.steps = 0


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far in this process, from dynamo's counters: a break is
    counted once per traced frame, so a generation's breaks are those of its first (tracing) run."""
    from torch._dynamo.utils import counters  # private; read-only

    return sum(counters["graph_break"].values()), int(counters["stats"]["unique_graphs"])


@dataclasses.dataclass
class Row:
    name: str
    compiled: bool
    full: str = "-"  # full steps / steps
    seconds: float | None = None
    breaks: int | None = None
    recompiles: int | None = None
    fullgraph: str = "-"
    distance: float | None = None
    error: str = ""


def measure(row: Row, run: Callable[[], torch.Tensor], reference: torch.Tensor | None, repeats: int,
            full_steps: Callable[[], str] | None = None, warmup: int = 2) -> torch.Tensor | None:
    """`warmup` generations (the first compiles; inductor's first runs of a new graph are slow
    for a while after), then `repeats` timed ones (graphs compiled during them are recompiles);
    fills `row`, returns the final latent."""
    before_breaks, _ = dynamo_counts()
    try:
        for _ in range(warmup):
            out = run()
    except Exception as e:  # a variant that does not run is a result, reported in its row
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        return None
    _, warm_graphs = dynamo_counts()
    if full_steps is not None:
        row.full = full_steps()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    breaks, graphs = dynamo_counts()
    row.seconds = statistics.median(times)
    if row.compiled:
        row.breaks = breaks - before_breaks
        row.recompiles = graphs - warm_graphs
    if reference is not None:
        row.distance = float((out.double() - reference.double()).norm() / reference.double().norm())
    return out


def markdown(rows: list[Row], baseline: str | None, steps: int) -> str:
    base = next((r.seconds for r in rows if r.name == baseline and r.seconds), None)
    lines = ["| variant | full steps | s/gen | ms/step | vs compiled | graph breaks | recompiles | fullgraph=True | rel. L2 to plain |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | - | failed: {r.error} | - | - | - | - | - | - |")
            continue
        ratio = f"{r.seconds / base:.2f}x" if base and r.seconds else "-"
        cell = (lambda v: "-" if v is None else str(v))
        dist = "-" if r.distance is None else f"{r.distance:.2e}"
        lines.append(f"| {r.name} | {r.full} | {r.seconds:.4f} | {r.seconds / steps * 1e3:.2f} | {ratio} | {cell(r.breaks)} | {cell(r.recompiles)} | "
                     f"{r.fullgraph} | {dist} |")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a table `markdown` wrote, as dicts by column name."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
