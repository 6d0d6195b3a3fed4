"""The `dcfx` console script: one subprocess run (`python -m dcfx graphs`, as a person types
it), every command through `dcfx.cli.main` in-process (same code, no interpreter start-up per
case), and `import dcfx` staying free of the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _tiny_unet import tiny_unet
from PIL import Image

from dcfx.cli import COMMANDS, command, main
from dcfx.cli import demo as demo_cmd
from dcfx.cli import profile as profile_cmd

FUSED_OP = "dcfx::cat_group_norm_silu"
TINY = ["--resolution", "8"]


def _dcfx(*args: str, cwd) -> str:
    """`python -m dcfx ARGS` in `cwd`; its stdout (it must succeed). One thread, as the
    in-process tests (tests/conftest.py): spinning OpenMP threads crawl on a loaded machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "dcfx", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _in(cwd, monkeypatch, capsys, *args: str) -> str:
    """`dcfx ARGS` in-process in `cwd`; its stdout (it must succeed)."""
    monkeypatch.chdir(cwd)
    assert main(list(args)) == 0
    return capsys.readouterr().out


def _error(capsys) -> str:
    """The one line a command prints for bad input."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A pipeline-style folder: the tiny U-Net's config and weights in unet/."""
    root = tmp_path_factory.mktemp("pipe")
    tiny_unet().save_pretrained(root / "unet")
    return root


# -- import dcfx ------------------------------------------------------------------------------

# Loaded by commands only: the CLI, the demo and its model, training, plotting, Ray, the judge.
NOT_BY_IMPORT_DCFX = ("dcfx.cli", "dcfx.models", "sklearn", "matplotlib", "ray", "tqdm.auto")


@pytest.mark.subprocess
def test_import_dcfx_loads_no_cli_demo_training_or_plotting_code(modules_after):
    # In a fresh interpreter (tests/conftest.py): what `import dcfx` (and touching its API)
    # loaded, what the parser of `dcfx serve` adds (not the demo's model), then what the demo's
    # command adds, which shows the check sees these modules where they are loaded.
    after_dcfx, after_serve, after_demo = (modules_after[s] for s in ("import dcfx", "the serve parser", "the demo command"))

    def for_commands_only(modules: list[str]) -> list[str]:
        return [m for m in modules if any(m == p or m.startswith(p + ".") for p in NOT_BY_IMPORT_DCFX)]

    assert for_commands_only(after_dcfx) == []
    assert for_commands_only(after_serve) == ["dcfx.cli", "dcfx.cli.serve"]
    assert {"dcfx.cli.demo", "dcfx.models.compare"} <= set(for_commands_only(after_demo))


# -- each command as a person runs it: its default outputs land in the current folder ----------


def test_commands_are_listed_in_help_order():
    assert COMMANDS == ("demo", "example", "profile", "graphs", "serve")
    for name in COMMANDS:
        module = command(name)
        assert callable(module.add_arguments) and callable(module.run) and module.__doc__
    with pytest.raises(ValueError, match="unknown command 'serv'; the commands are demo, example"):
        command("serv")


@pytest.mark.trained
def test_demo_command_runs(tmp_path, monkeypatch, capsys):
    out = _in(tmp_path, monkeypatch, capsys, "demo", "--samples", "4", "--steps", "4", "--settings", "2:0",
              "--no-matched", "--out", "grid.png")
    assert "accuracy" in out and "dcfx N=2 b=0" in out and "wrote" in out
    with Image.open(tmp_path / "grid.png") as im:
        assert im.info.get("Software") == "dcfx demo"


@pytest.mark.slow
def test_example_command_prints_the_step_sequence_flops_and_times(tmp_path, monkeypatch, capsys):
    out = _in(tmp_path, monkeypatch, capsys, "example", "--size", "tiny", "--steps", "6", "--repeats", "1")
    assert "dcfx report" in out and "GFLOPs" in out
    steps = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
    assert [s[2] for s in steps] == ["full", "shallow", "shallow", "full", "shallow", "shallow"]
    assert "x);" in out  # the speedup ratio


@pytest.mark.slow
def test_profile_command_runs(tmp_path, monkeypatch, capsys):
    out = _in(tmp_path, monkeypatch, capsys, "profile", "--size", "tiny", *TINY, "--steps", "2", "--interval", "2",
              "--device", "cpu", "--top", "3")
    assert "shallow/full step time" in out
    assert json.loads((tmp_path / "dcfx-trace.json").read_text())["otherData"]["steps"] == "FS"


@pytest.mark.subprocess
def test_graphs_command_runs(tmp_path):
    out = _dcfx("graphs", "--size", "tiny", *TINY, cwd=tmp_path)
    assert "dcfx cut at branch 0" in out
    assert sorted(p.name for p in (tmp_path / "dcfx-graphs").iterdir()) == ["cut.txt", "full.py", "shallow.py"]


# -- in-process: the commands' paths and their bad input --------------------------------------


def test_no_command_prints_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.trained
def test_demo_prints_the_table_and_writes_the_grid(tmp_path, capsys, digits_judge):
    grid = tmp_path / "grid.png"
    assert main(["demo", "--samples", "10", "--steps", "6", "--settings", "3:0", "--out", str(grid), "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("setting"))
    for column in ("time s", "speedup", "FLOPs", "accuracy", "Fréchet", "PSNR dB"):
        assert column in header
    names = [line.split("  ")[0].strip() for line in lines[lines.index(header) + 2 :] if line[:4] in ("DDIM", "dcfx")]
    assert names == ["DDIM 6", "dcfx N=3 b=0", "DDIM 2"]  # plain, dcfx, its FLOP-matched DDIM
    with Image.open(grid) as im:
        assert im.info.get("Software") == "dcfx demo" and im.height >= 3 * 48
    # Its own grid may be replaced (a foreign file may not: below).
    assert demo_cmd.check_output(grid, force=False) == f"replacing {grid}, written by an earlier demo"


@pytest.mark.slow
def test_demo_runs_a_plain_diffusers_unet_folder_with_another_scheduler(model_folder, tmp_path, capsys):
    assert main(["demo", "--model", str(model_folder), "--samples", "2", "--steps", "4", "--settings", "2:1:f1",
                 "--scheduler", "unipc", "--no-matched", "--out", str(tmp_path / "g.png"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "PSNR dB" in out and "accuracy" not in out  # no judge for a foreign model
    rows = [line.split("  ")[0] for line in out.splitlines() if line.startswith(("UniPC", "dcfx N"))]
    assert rows == ["UniPC 4", "dcfx N=2 b=1 forecast 1"] and "UniPC 4 steps" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0"], "--samples and --steps must be >= 1, got 0 and 50"),
        (["--settings", "3"], "setting '3' must be N:B[:nonuniform][:fK] (a fixed schedule) or SIGNAL:B"),
        (["--settings", "3:0:cosine"], "schedule must be one of"),
        (["--settings", "sharp:0"], "signals cut, accumulated, latent"),
        (["--settings", "cut:0:-1"], "threshold must be a number > 0"),
        (["--settings", "3:0:f3"], "forecast must be one of (0, 1, 2)"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_demo_bad_arguments(argv, message, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "g.png"), *argv]) == 2
    assert message in _error(capsys)


def test_demo_refuses_foreign_files_and_folders_that_hold_no_unet(tmp_path, capsys):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"precious")
    assert main(["demo", "--out", str(mine)]) == 2
    err = _error(capsys)
    assert "mine.png exists and was not written by dcfx demo" in err and "--force" in err
    assert mine.read_bytes() == b"precious"
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert main(["demo", "--model", str(vae), "--out", str(tmp_path / "g.png")]) == 2
    err = _error(capsys)
    assert "is not a diffusers U-Net" in err and "DigitsPipeline" in err  # names both kinds it takes
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]) == 2
    assert "no such folder" in _error(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--interval", "0"], "interval must be"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--device", "meta"], "--device meta computes nothing"),
    ],
)
def test_example_bad_arguments(argv, message, capsys):
    assert main(["example", "--size", "tiny", *argv]) == 2
    assert message in _error(capsys)


@pytest.mark.slow
def test_profile_command(model_folder, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--model", str(model_folder), *TINY, "--steps", "4", "--interval", "2",
                 "--trace", str(trace), "--device", "cpu", "--threads", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    for text in ("UNet2DConditionModel from", "full steps:", "shallow steps:", f"fused op {FUSED_OP}",
                 "cache copy dcfx.cache_copy", "shallow/full step time", "in FLOPs", "ui.perfetto.dev"):
        assert text in out, text
    data = json.loads(trace.read_text())
    assert data["otherData"]["producer"] == "dcfx profile" and data["otherData"]["steps"] == "FSFS"
    names = [e.get("name") for e in data["traceEvents"]]
    assert names.count("dcfx.full[b0]") == 2 and names.count("dcfx.shallow[b0]") == 2
    assert names.count("dcfx.cache_copy") == 2 and names.count("step 3") == 1
    # Its own file may be replaced; a foreign one may not (unless forced).
    assert "written by an earlier dcfx profile" in profile_cmd.check_trace(trace, force=False)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main(["profile", "--size", "tiny", *TINY, "--trace", str(foreign)]) == 2
    err = _error(capsys)
    assert "was not written by dcfx profile" in err and "--force" in err
    assert foreign.read_text() == '{"mine": 1}'
    assert profile_cmd.check_trace(foreign, force=True) == f"overwrote {foreign} (--force)"


@pytest.mark.slow
def test_graphs_command(model_folder, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["graphs", "--size", "tiny", *TINY, "--out", str(out), "--branch", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny U-Net" in printed and "dcfx cut at branch 1" in printed and "meta" in printed
    assert sorted(p.name for p in out.iterdir()) == ["cut.txt", "full.py", "shallow.py"]
    # Its own files are replaced; here with a --model folder (only its config is read).
    assert main(["graphs", "--model", str(model_folder), *TINY, "--out", str(out), "--no-fuse"]) == 0
    assert "UNet2DConditionModel from" in capsys.readouterr().out
    assert "cat_group_norm_silu" not in (out / "shallow.py").read_text()
    (out / "full.py").write_text("# my notes\n")
    assert main(["graphs", "--size", "tiny", "--out", str(out)]) == 2
    assert "full.py exists and was not written by dcfx" in _error(capsys)
    assert (out / "full.py").read_text() == "# my notes\n"


def test_profile_and_graphs_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command, output in (("profile", "--trace"), ("graphs", "--out")):
        assert main([command, "--model", str(tmp_path / "empty"), output, str(tmp_path / "o")]) == 2
        assert "is not a diffusers U-Net" in _error(capsys)
    assert main(["profile", "--model", str(tmp_path / "missing"), "--trace", str(tmp_path / "t.json")]) == 2
    assert "no such folder" in _error(capsys)
    for argv, message in (
        (["profile", "--steps", "0"], "--steps must be >= 1"),
        (["profile", "--device", "meta"], "--device meta computes nothing to profile"),
        (["graphs", "--batch", "0"], "--batch must be >= 1"),
        (["graphs", "--branch", "-1"], "--branch must be >= 0"),
    ):
        assert main(argv) == 2
        assert message in _error(capsys)


@pytest.mark.slow
def test_profile_and_graphs_take_the_flux_digits_transformer(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["graphs", "--model", "flux-digits", "--out", str(out), "--first-blocks", "1", "--last-blocks", "1"]) == 0
    printed = capsys.readouterr().out
    assert "FluxTransformer2DModel from flux-digits" in printed and "dcfx cut at F1B1 (the first 1 and the last 1 of 6" in printed
    assert "only full steps run" in printed and "single_transformer_blocks" in printed
    trace = tmp_path / "trace.json"
    assert main(["profile", "--model", "flux-digits", "--steps", "4", "--interval", "2", "--trace", str(trace),
                 "--device", "cpu", "--threads", "1", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "flow-matching Euler steps" in printed and "shallow/full step time" in printed
    names = [e.get("name") for e in json.loads(trace.read_text())["traceEvents"]]
    assert names.count("dcfx.full[F1B0]") == 2 and names.count("dcfx.shallow[F1B0]") == 2
    assert main(["graphs", "--model", "flux-digits", "--out", str(tmp_path / "h"), "--branch", "1"]) == 2
    assert "set first_blocks/last_blocks (Fn, Bn), not branch" in _error(capsys)
