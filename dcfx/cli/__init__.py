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
import importlib
import sys
from types import ModuleType

# The order of `dcfx --help`. A command's module is imported only when it runs (or when the
# help lists them all): `dcfx serve` then loads neither the demo's model nor its judge.
COMMANDS: tuple[str, ...] = ("demo", "example", "profile", "graphs", "serve")
_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)


def command(name: str) -> ModuleType:
    """The module of the subcommand `name` (one of `COMMANDS`)."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)}")
    return importlib.import_module(f".{name}", __name__)


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `dcfx` argument parser, a subparser per entry of `COMMANDS` (only `only`'s when given)."""
    p = argparse.ArgumentParser(prog="dcfx", description="DeepCache for diffusion U-Nets as a compiled graph pass.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        module = command(name)
        doc = (module.__doc__ or name).split("\n\n")
        sp = sub.add_parser(name, help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:2]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs `dcfx ARGV...`; returns the exit status (2: bad input or no command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level takes no option but --help: a known first word is the command.
    p = parser(argv[0] if argv and argv[0] in COMMANDS else None)
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
