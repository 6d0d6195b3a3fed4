"""`dcfx demo`: DeepCache on a trained model, quality and time side by side.

Samples the same noise with plain DDIM (or `--scheduler`: DPM-Solver++ 2M, UniPC), with dcfx
at a few settings (fixed schedules, forecasts, adaptive gates), and with the plain sampler at
fewer steps costing about the same FLOPs as each dcfx setting; prints one
table (wall time, speedup in this run, FLOPs ratio from `dcfx.report`, class accuracy,
Fréchet distance to held-out digits, PSNR against the plain samples) and writes a PNG grid,
one row per setting.

By default the model is the embedded digits model (`dcfx.models.digits()`); `--model PATH`
takes a local digits folder or any diffusers U-Net folder (a `config.json` of a U-Net, or a
pipeline folder with `unet/`): then the conditioning is a fixed random embedding, there is
no guidance, and accuracy and Fréchet distance, which need the digits judge, are left out.

Sampling and scoring live in `dcfx.models.compare` (shared with
`benchmarks/fidelity_study.py`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..models.loader import load, model_kind
from ..models.compare import SCHEDULERS, Result, Sampler, Setting, evaluate, make_scheduler, matched_ddim
from ..config import SETTING_FORMS, DeepCacheConfig
from ..models.digits import DEFAULT_GUIDANCE_SCALE
from ..models.quality import judge as make_judge

PNG_MARK = "dcfx demo"  # PNG text tag: files carrying it were written by the demo


def load_model(path: str | None) -> tuple[Any, bool]:
    """(model, is_digits): the digits pipeline (embedded or a folder of it), or a U-Net (a
    U-Net folder, or a pipeline folder's U-Net)."""
    is_digits = model_kind(path) == "digits"
    model = load(path, unet=not is_digits)
    if not is_digits and getattr(model.config, "addition_embed_type", None):
        raise ValueError(
            f"--model {path}: this U-Net needs added conditioning "
            f"(addition_embed_type={model.config.addition_embed_type!r}, e.g. SDXL), which "
            f"the demo does not make up; use dcfx.enable on its own pipeline instead"
        )
    return model, is_digits


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


DEFAULT_SETTINGS = ("3:0", "5:0", "2:0", "2:0:f1")  # 2:0:f1: the fidelity study's best policy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local digits or diffusers U-Net folder (default: the embedded digits model)")
    p.add_argument("--samples", type=int, default=40, help="samples per setting (same noise for all)")
    p.add_argument("--steps", type=int, default=50, help="steps of the plain reference and of dcfx")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim",
                   help="the sampler: the model's own DDIM (default), or another with 'trailing' timestep spacing "
                        "(dpm++2m and unipc are the strong few-step solvers)")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="SETTING",
                   help=f"dcfx settings, each {SETTING_FORMS}, then any DeepCacheConfig FIELD=VALUE (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (digits default 1.5; 1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-matched", action="store_true", help="skip the fewer-step plain rows")
    p.add_argument("--out", type=Path, default=Path("dcfx_demo.png"), help="PNG grid to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --out even if the demo did not write it")
    p.add_argument("--columns", type=int, default=20, help="samples per row in the grid")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def run(args: argparse.Namespace) -> str:
    """Runs the demo; returns (and prints) the table."""
    if args.samples < 1 or args.steps < 1:
        raise ValueError(f"--samples and --steps must be >= 1, got {args.samples} and {args.steps}")
    settings = [Setting.of(args.steps, DeepCacheConfig.from_setting(s)) if isinstance(s, str) else s for s in args.settings]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    note = check_output(args.out, args.force)
    model, is_digits = load_model(args.model)
    if is_digits:
        model.set_progress_bar_config(disable=True)
    guidance = args.guidance if args.guidance is not None else (DEFAULT_GUIDANCE_SCALE if is_digits else 1.0)
    judge = make_judge() if is_digits else None
    sampler_name = SCHEDULERS[args.scheduler][0]
    scheduler = None
    if args.scheduler != "ddim":  # "ddim": the model's scheduler as it ships
        base = model.scheduler.config if is_digits else {}
        scheduler = make_scheduler(args.scheduler, base, "trailing")
        if is_digits:
            model.scheduler = scheduler
    sampler = Sampler(model, args.samples, args.seed, guidance, scheduler)
    plain = Setting.plain(args.steps, sampler_name)
    base_flops = sampler.flops(plain)
    results: list[Result] = []
    done: set[Setting] = set()
    progress = tqdm(total=1 + len(settings) * (1 if args.no_matched else 2), desc="dcfx demo", unit="setting")

    def run_one(s: Setting) -> Result:
        r = sampler.run(s)
        # An adaptive setting's cost is what it ran; the others' follow from their schedule.
        r.flops_ratio = sampler.flops(s, r.history if s.config is not None else None) / base_flops
        results.append(r)
        done.add(s)
        progress.update()
        return r

    run_one(plain)
    for s in settings:
        r = run_one(s)
        if not args.no_matched:
            m = matched_ddim(sampler, s, args.steps, r.history, sampler_name)
            if m not in done:
                run_one(m)
    progress.close()
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
        f"{sampler_name} {args.steps} steps, guidance {guidance:g}, seed {args.seed}, torch threads {torch.get_num_threads()}; "
        f"speedups from this one run; FLOPs relative to {sampler_name} {args.steps}"
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
