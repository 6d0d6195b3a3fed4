"""The `dcfx` console script (also `python -m dcfx`): one command, a subcommand per job.

    dcfx demo      DeepCache on the embedded trained digits model: time and quality, PNG grid
    dcfx example   DeepCache on a random-weight SD-shaped U-Net, step by step
    dcfx profile   torch.profiler of a generation: top operators of full and shallow steps, trace
    dcfx graphs    the full and the shallow graph's code, and where the U-Net is cut
"""

from __future__ import annotations

import argparse
import sys

from . import demo, example, graphs_cli, profile, serve_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dcfx", description="DeepCache for diffusion U-Nets as a compiled graph pass.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in (("demo", demo), ("example", example), ("profile", profile), ("graphs", graphs_cli), ("serve", serve_cli)):
        doc = module.__doc__.split("\n\n")
        sp = sub.add_parser(name, help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:2]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Bad input: one clear line, not a traceback.
        print(f"dcfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
