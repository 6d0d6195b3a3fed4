"""benchmarks/bench_unet.py end to end on a tiny saved U-Net: one CSV and markdown row per variant."""

import csv

import pytest
import torch
from _benchmarks import script
from _tiny_unet import tiny_unet
from _tolerance import FACTOR, as_float64, float32_bound, float64_copy


@pytest.mark.slow
def test_bench_unet_writes_one_row_per_variant(tmp_path, capsys, monkeypatch):
    bench = script("bench_unet")
    runs = []  # (runner, the generation's other arguments, final latents) of every generation
    generation = bench.generation

    def recorded(runner, *args, **kwargs):
        seconds, final = generation(runner, *args, **kwargs)
        runs.append((runner, args, final))
        return seconds, final

    monkeypatch.setattr(bench, "generation", recorded)
    model = tmp_path / "unet"
    tiny_unet().save_pretrained(model)  # also covers --model with a U-Net folder
    csv_path, md_path = tmp_path / "out" / "r.csv", tmp_path / "out" / "r.md"
    code = bench.main([
        "--model", str(model), "--steps", "2", "--repeats", "1", "--device", "cpu",
        "--variants", "dcfx", "eager", "reference", "--no-progress",
        "--csv", str(csv_path), "--md", str(md_path),
    ])
    assert code == 0

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["eager", "reference", "dcfx"]  # progressive order
    assert all(float(r["median_s"]) > 0 and float(r["first_gen_s"]) > 0 for r in rows)
    assert rows[0]["resolution"] == "8" and rows[0]["unet_batch"] == "2"  # native size, CFG batch
    dcfx_row = rows[2]
    assert dcfx_row["branch"] == "0" and dcfx_row["baseline"] == "eager"
    assert float(dcfx_row["flop_bound"]) > 1 and float(dcfx_row["vs_eager"]) > 0
    # dcfx runs the reference helper's computation: same final latents up to float32 rounding.
    # Each float32 run is within FACTOR times the reference's own error of the reference's
    # float64 run (tests/_tolerance.py), so the two are at most FACTOR + 1 times that apart.
    runner, (scheduler, latents, cond, args, device), ref32 = next(r for r in runs if isinstance(r[0], bench._Reference))
    reference64 = bench._Reference(float64_copy(runner.unet), scheduler, args.interval, args.branch[0])
    with torch.no_grad():
        _, ref64 = generation(reference64, scheduler, latents.double(), as_float64(cond), args, device)
    bound = float32_bound(ref32, ref64, FACTOR + 1) / float(ref32.double().norm())
    assert dcfx_row["rel_err_vs"] == "reference" and float(dcfx_row["rel_err"]) <= bound, (dcfx_row["rel_err"], bound)

    table = [line for line in md_path.read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].strip("| ") for line in table[1:]] == ["eager", "reference", "dcfx"]
    assert "RSS-based" in md_path.read_text()
    assert table[0] in capsys.readouterr().out  # the table is printed too


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "eager", "dcfx-cudagraph", "--device", "cpu"], "CUDA-only variant(s) dcfx-cudagraph need --device cuda"),
        (["--variants", "reference", "--schedule", "nonuniform", "--device", "cpu"], "schedules only uniformly"),
        (["--compile-options", "freezing"], "expected KEY=VALUE"),
    ],
)
def test_bench_unet_refuses_bad_settings(argv, message, capsys):
    with pytest.raises(SystemExit):
        script("bench_unet").parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_partial_or_differently_compiled_run_never_writes_over_the_full_table(tmp_path):
    bench = script("bench_unet")
    device = bench.torch.device("cpu")
    docs_run = ["--arch", "sd15", "--resolution", "32", "--batch", "1", "--steps", "10", "--interval", "3",
                  "--branch", "0", "--device", "cpu", "--repeats", "3"]
    full = bench.default_output(bench.parse_args(docs_run), device, ".md")
    assert full.exists(), full  # docs/measurements.md's committed full table is what this run writes
    others = [
        ["--variants", "eager", "dcfx"],
        ["--variants", *bench.default_variants(device, "uniform")],  # named, even if all
        ["--compile-options", "layout_optimization=False"],
        ["--variants", "compile", "dcfx-compile", "--compile-mode", "max-autotune-no-cudagraphs"],
    ]
    paths = [bench.default_output(bench.parse_args(docs_run + extra), device, ".md") for extra in others]
    assert full not in paths and len(set(paths)) == len(paths)
    assert paths[0].name.endswith("_uniform_eager+dcfx.md")
    # Named outputs are used as given.
    args = bench.parse_args(docs_run + ["--variants", "eager", "--md", str(tmp_path / "x.md")])
    assert args.md == tmp_path / "x.md"
