"""The documented examples run: the API docstring and `dcfx example` (the random-weight walk-through)."""

import doctest
import subprocess
import sys

import dcfx.api


def test_api_docstring_examples():
    result = doctest.testmod(dcfx.api)
    assert result.attempted > 0 and result.failed == 0


def test_example_cli_prints_the_step_sequence_flops_and_times():
    out = subprocess.run(
        [sys.executable, "-m", "dcfx", "example", "--size", "tiny", "--steps", "6", "--repeats", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    assert "dcfx report" in out and "GFLOPs" in out
    steps = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 5]
    assert [s[2] for s in steps] == ["full", "shallow", "shallow", "full", "shallow", "shallow"]
    assert "x);" in out  # the speedup ratio


def test_console_script_without_a_command_prints_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "dcfx"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "demo" in out.stdout and "example" in out.stdout
