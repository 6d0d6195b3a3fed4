"""The `dcfx` console script (also `python -m dcfx`): one command, a subcommand per job.

    dcfx demo      DeepCache on the embedded trained digits model: time and quality, PNG grid
    dcfx example   DeepCache on a random-weight SD-shaped U-Net, step by step
    dcfx profile   torch.profiler of a generation: top operators of full and shallow steps, trace
    dcfx graphs    the full and the shallow graph's code, and where the U-Net is cut
    dcfx serve     a Ray Serve deployment of a pipeline over HTTP (needs the serve extra)

A subcommand is a module here with `add_arguments(parser)` and `run(args)`, listed in
`COMMANDS`; its docstring's first paragraph is its help. `run` raises ValueError,
FileNotFoundError or FileExistsError for bad input (printed as one line, exit status 2).
`import dcfx` imports none of this.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from . import demo, example, graphs, profile, serve

# (name, module): the order of `dcfx --help`. A command's heavy or optional dependencies are
# imported inside its `run`, so that `dcfx --help` and the other commands stay quick.
COMMANDS: list[tuple[str, ModuleType]] = [
    ("demo", demo),
    ("example", example),
    ("profile", profile),
    ("graphs", graphs),
    ("serve", serve),
]
_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)


def parser() -> argparse.ArgumentParser:
    """The `dcfx` argument parser, a subparser per entry of `COMMANDS`."""
    p = argparse.ArgumentParser(prog="dcfx", description="DeepCache for diffusion U-Nets as a compiled graph pass.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS:
        doc = (module.__doc__ or name).split("\n\n")
        sp = sub.add_parser(name, help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:2]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs `dcfx ARGV...`; returns the exit status (2: bad input or no command)."""
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    try:
        args.run(args)
    except _BAD_INPUT as e:
        # Bad input: one clear line, not a traceback.
        print(f"dcfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
