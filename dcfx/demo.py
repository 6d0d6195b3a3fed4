"""`dcfx demo`: DeepCache on a trained model, quality and time side by side.

Samples the same noise with plain DDIM, with dcfx at a few (interval, branch) settings, and
with plain DDIM at fewer steps costing about the same FLOPs as each dcfx setting; prints one
table (wall time, speedup in this run, FLOPs ratio from `dcfx.report`, class accuracy,
Fréchet distance to held-out digits, PSNR against the plain samples) and writes a PNG grid,
one row per setting.

By default the model is the embedded digits model (`dcfx.models.digits()`); `--model PATH`
takes a local digits folder or any diffusers U-Net folder (a `config.json` of a U-Net, or a
pipeline folder with `unet/`): then the conditioning is a fixed random embedding, there is
no guidance, and accuracy and Fréchet distance, which need the digits judge, are left out.

The pieces (`Setting`, `Sampler`, `evaluate`, `matched_ddim`) are shared with
`benchmarks/fidelity_study.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .api import disable, enable, optimize
from .config import DeepCacheConfig
from .report import report

PNG_MARK = "dcfx demo"  # PNG text tag: files carrying it were written by the demo


@dataclass(frozen=True)
class Setting:
    """One way of sampling: plain DDIM (`config=None`) or dcfx with `config`, at `steps`."""

    name: str
    steps: int
    config: DeepCacheConfig | None = None

    @staticmethod
    def plain(steps: int) -> "Setting":
        return Setting(f"DDIM {steps}", steps)

    @staticmethod
    def dcfx(steps: int, interval: int, branch: int, schedule: str = "uniform") -> "Setting":
        tag = "" if schedule == "uniform" else f" {schedule}"
        return Setting(f"dcfx N={interval} b={branch}{tag}", steps, DeepCacheConfig(interval=interval, branch=branch, schedule=schedule))


@dataclass
class Result:
    setting: Setting
    images: torch.Tensor  # (n, C, H, W), float32 in [0, 1] for the digits model
    seconds: float
    flops_ratio: float  # FLOPs of this setting / FLOPs of the plain reference setting
    history: str = ""


class Sampler:
    """Runs settings on one model with fixed noise and labels; knows its FLOP costs.

    `model` is a `DigitsPipeline` (sampled through the pipeline with `dcfx.enable`, as a user
    would) or a bare U-Net (sampled by a DDIM loop with `DeepCacheUNet.begin`).
    """

    def __init__(self, model: Any, num_samples: int, seed: int, guidance_scale: float, scheduler: Any = None):
        self.model = model
        self.is_pipeline = hasattr(model, "unet")
        self.unet: nn.Module = model.unet if self.is_pipeline else model
        cfg = self.unet.config
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num_samples) % 10
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.latents = torch.randn(num_samples, cfg.in_channels, size, size, generator=gen)
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        # A bare conditional U-Net gets a fixed random stand-in for a text embedding.
        width = getattr(cfg, "cross_attention_dim", None)
        self.cond = None if self.is_pipeline or width is None else torch.randn(num_samples, 77, width, generator=gen)
        self._costs: dict[tuple, tuple[int, int, int]] = {}

    def run(self, setting: Setting) -> Result:
        """Samples `setting` once (timed), after an untimed warm-up that builds its graphs."""
        if setting.config is not None:
            self._generate(setting, warmup=True)  # capture/split outside the timing
        start = time.perf_counter()
        images, history = self._generate(setting)
        seconds = time.perf_counter() - start
        return Result(setting, images, seconds, float("nan"), history)

    def flops(self, setting: Setting) -> float:
        """FLOPs of one generation of `setting` (for one sample's CFG batch), from dcfx.report."""
        full, shallow, num_full = self._cost(setting)
        return num_full * full + (setting.steps - num_full) * shallow

    def _cost(self, setting: Setting) -> tuple[int, int, int]:
        config = setting.config or DeepCacheConfig(interval=1)
        key = (config.branch, config.interval, config.schedule, setting.steps)
        if key not in self._costs:
            args, kwargs = self._example_call()
            r = report(self.unet, *args, config=config, num_steps=setting.steps, branches=[config.branch], **kwargs).branches[0]
            self._costs[key] = (r.full_flops, r.shallow_flops, r.num_full_steps)
        return self._costs[key]

    def _example_call(self) -> tuple[tuple, dict]:
        batch = 2 if self.is_pipeline and self.guidance_scale > 1 else 1
        x = self.latents[:1].repeat(batch, 1, 1, 1)
        t = torch.tensor([999])
        if self.is_pipeline:
            ehs = self.model.label_embedding(torch.zeros(batch, dtype=torch.int64))
            return (x, t), {"encoder_hidden_states": ehs.detach()}
        if self.cond is not None:
            return (x, t), {"encoder_hidden_states": self.cond[:1]}
        return (x, t), {}

    def _generate(self, setting: Setting, warmup: bool = False) -> tuple[torch.Tensor, str]:
        steps = 2 if warmup else setting.steps
        if self.is_pipeline:
            pipe = self.model
            fast = enable(pipe, setting.config) if setting.config is not None else None
            try:
                out = pipe(self.labels, num_inference_steps=steps, guidance_scale=self.guidance_scale,
                           latents=self.latents.clone(), output_type="pt")
            finally:
                if fast is not None:
                    disable(pipe)
            return out.images, (fast.history[-1] if fast is not None else "F" * steps)
        return self._generate_unet(setting, steps)

    @torch.no_grad()
    def _generate_unet(self, setting: Setting, steps: int) -> tuple[torch.Tensor, str]:
        from diffusers import DDIMScheduler

        scheduler = self.scheduler or DDIMScheduler()
        unet = optimize(self.unet, setting.config) if setting.config is not None else self.unet
        scheduler.set_timesteps(steps)
        if setting.config is not None:
            unet.begin(steps)
        x = self.latents.clone() * scheduler.init_noise_sigma
        kwargs = {} if self.cond is None else {"encoder_hidden_states": self.cond}
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t, **kwargs).sample
            x = scheduler.step(eps, t, x).prev_sample
        return x, (unet.history[-1] if setting.config is not None else "F" * steps)


def matched_ddim(sampler: Sampler, setting: Setting, reference_steps: int) -> Setting:
    """Plain DDIM with the step count whose FLOPs are closest to `setting`'s."""
    full = sampler.flops(Setting.plain(1))
    steps = max(1, round(sampler.flops(setting) / full))
    return Setting.plain(min(steps, reference_steps))


def evaluate(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, judge: Any | None) -> dict[str, float]:
    """accuracy and Fréchet distance (with a judge), PSNR and max error against `reference`."""
    from .models.quality import psnr

    out: dict[str, float] = {}
    if judge is not None:
        out["accuracy"] = judge.accuracy(images, labels)
        out["frechet"] = judge.frechet_to_test(images)
    lo, hi = float(reference.min()), float(reference.max())
    scale = (hi - lo) or 1.0  # digits live in [0, 1]; a bare U-Net's samples in their own range
    out["psnr"] = psnr((images - lo) / scale, (reference - lo) / scale)
    out["max_err"] = float((images - reference).abs().max())
    return out


# -- the command ----------------------------------------------------------------------------


def load_model(path: str | None) -> tuple[Any, bool]:
    """(model, is_digits): the embedded digits pipeline, a digits folder, or a U-Net folder."""
    from .models import digits, load_pipeline

    if path is None:
        return digits(), True
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder (expected a diffusers U-Net or digits model folder)")
    index = root / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "DigitsPipeline":
        return load_pipeline(root), True
    for folder in (root, root / "unet"):
        config = folder / "config.json"
        if config.is_file():
            name = json.loads(config.read_text()).get("_class_name")
            if name in ("UNet2DConditionModel", "UNet2DModel"):
                import diffusers

                unet = getattr(diffusers, name).from_pretrained(folder, low_cpu_mem_usage=False).eval()
                if getattr(unet.config, "addition_embed_type", None):
                    raise ValueError(
                        f"--model {path}: this U-Net needs added conditioning "
                        f"(addition_embed_type={unet.config.addition_embed_type!r}, e.g. SDXL), which "
                        f"the demo does not make up; use dcfx.enable on its own pipeline instead"
                    )
                return unet, False
    raise ValueError(
        f"--model {path} is not a diffusers U-Net: expected config.json with _class_name "
        f"UNet2DConditionModel or UNet2DModel in it or in its unet/ subfolder, or a digits "
        f"model folder (model_index.json with _class_name DigitsPipeline)"
    )


def parse_setting(text: str, steps: int) -> Setting:
    """'3:0' -> interval 3, branch 0; '5:0:nonuniform' adds the schedule."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return Setting.dcfx(steps, int(parts[0]), int(parts[1]), *(parts[2:] or ["uniform"]))
    except ValueError as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(
            f"setting {text!r} must be INTERVAL:BRANCH or INTERVAL:BRANCH:SCHEDULE "
            f"(schedule uniform or nonuniform), e.g. 3:0{detail}"
        ) from None


def check_output(path: Path, force: bool) -> str | None:
    """Refuses to overwrite a file the demo did not write, unless forced; says what it does."""
    if not path.exists():
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            ours = im.info.get("Software") == PNG_MARK
    except Exception:
        ours = False
    if ours:
        return f"replacing {path}, written by an earlier demo"
    if not force:
        raise FileExistsError(f"{path} exists and was not written by dcfx demo: choose another --out, or pass --force to overwrite it")
    return f"overwriting {path} (--force)"


def save_grid(results: Sequence[Result], path: Path, columns: int) -> None:
    """One row per setting (its name on the left), the first `columns` samples each."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    zoom, label_w, pad = 3, 150, 2
    first = results[0].images
    h, w = first.shape[-2] * zoom, first.shape[-1] * zoom
    n = min(columns, len(first))
    grid = Image.new("RGB", (label_w + n * (w + pad), len(results) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for row, r in enumerate(results):
        y = row * (h + pad)
        draw.text((4, y + h // 2 - 6), r.setting.name, fill="black")
        for col in range(n):
            grid.paste(_to_pil(r.images[col], zoom), (label_w + col * (w + pad), y))
    info = PngInfo()
    info.add_text("Software", PNG_MARK)
    grid.save(path, pnginfo=info)


def _to_pil(image: torch.Tensor, zoom: int):
    from PIL import Image

    x = image.float()
    if x.shape[0] not in (1, 3):
        x = x[:3] if x.shape[0] > 3 else x[:1]
    if x.min() < 0 or x.max() > 1:  # latents: stretch to [0, 1] for display
        x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    return im.resize((im.width * zoom, im.height * zoom), Image.NEAREST).convert("RGB")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A plain-text table: columns are (key, header, formatter)."""
    cells = [[fmt(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda cs: "  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(heads), line(["-" * wd for wd in widths]), *map(line, cells)])


DEFAULT_SETTINGS = ("3:0", "5:0", "3:2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local digits or diffusers U-Net folder (default: the embedded digits model)")
    p.add_argument("--samples", type=int, default=40, help="samples per setting (same noise for all)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the plain reference and of dcfx")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="N:B[:SCHEDULE]",
                   help="dcfx settings, interval:branch[:uniform|nonuniform] (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (digits default 1.5; 1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-matched", action="store_true", help="skip the fewer-step DDIM rows")
    p.add_argument("--out", type=Path, default=Path("dcfx_demo.png"), help="PNG grid to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --out even if the demo did not write it")
    p.add_argument("--columns", type=int, default=20, help="samples per row in the grid")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def run(args: argparse.Namespace) -> str:
    """Runs the demo; returns (and prints) the table."""
    if args.samples < 1 or args.steps < 1:
        raise ValueError(f"--samples and --steps must be >= 1, got {args.samples} and {args.steps}")
    settings = [parse_setting(s, args.steps) if isinstance(s, str) else s for s in args.settings]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    note = check_output(args.out, args.force)
    model, is_digits = load_model(args.model)
    if is_digits:
        model.set_progress_bar_config(disable=True)
    from .models.digits import DEFAULT_GUIDANCE_SCALE

    guidance = args.guidance if args.guidance is not None else (DEFAULT_GUIDANCE_SCALE if is_digits else 1.0)
    judge = None
    if is_digits:
        from .models.quality import judge as make_judge

        judge = make_judge()
    sampler = Sampler(model, args.samples, args.seed, guidance)
    plain = Setting.plain(args.steps)
    todo = [plain]
    for s in settings:
        todo.append(s)
        if not args.no_matched:
            m = matched_ddim(sampler, s, args.steps)
            if m not in todo:
                todo.append(m)
    base_flops = sampler.flops(plain)
    results = []
    for s in tqdm(todo, desc="dcfx demo", unit="setting"):
        r = sampler.run(s)
        r.flops_ratio = sampler.flops(s) / base_flops
        results.append(r)
    ref = results[0]
    rows = []
    for r in results:
        row = {"name": r.setting.name, "seconds": r.seconds, "speedup": ref.seconds / r.seconds, "flops": r.flops_ratio}
        row.update(evaluate(r.images, sampler.labels, ref.images, judge))
        if r is ref:
            row["psnr"] = row["max_err"] = None
        rows.append(row)
    columns = [
        ("name", "setting", str),
        ("seconds", "time s", lambda v: f"{v:.2f}"),
        ("speedup", "speedup", lambda v: f"{v:.2f}x"),
        ("flops", "FLOPs", lambda v: f"{100 * v:.0f}%"),
        ("accuracy", "accuracy", lambda v: f"{100 * v:.1f}%"),
        ("frechet", "Fréchet", lambda v: f"{v:.2f}"),
        ("psnr", "PSNR dB", lambda v: "inf" if math.isinf(v) else f"{v:.1f}"),
        ("max_err", "max err", lambda v: f"{v:.3f}"),
    ]
    if not is_digits:
        columns = [c for c in columns if c[0] not in ("accuracy", "frechet")]
    head = (
        f"dcfx demo: {'digits model' if args.model is None else args.model}, {args.samples} samples, "
        f"DDIM {args.steps} steps, guidance {guidance:g}, seed {args.seed}, torch threads {torch.get_num_threads()}; "
        f"speedups from this one run; FLOPs relative to DDIM {args.steps}"
    )
    if judge is not None:
        head += f"; judge accuracy on held-out digits {100 * judge.test_accuracy:.1f}%"
    table = head + "\n" + format_table(rows, columns)
    print(table)
    save_grid(results, args.out, args.columns)
    if note:
        print(note)
    print(f"wrote {args.out.resolve()} (rows: {', '.join(r.setting.name for r in results)})")
    return table
