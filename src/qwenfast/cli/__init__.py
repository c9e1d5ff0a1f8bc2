"""`qwenfast` command line: one module per subcommand (decode, bench, generate).

Each subcommand module defines `add_parser(subparsers)` (registers its parser, sets `run` as the
handler) and `run(args) -> int`. Bad input raises `CLIError`: `main` prints it as one line on stderr
and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import CLIError

SUBCOMMANDS = ("decode", "bench", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenfast",
        description="Fast Qwen-Image inference: decode latents, benchmark the VAE, generate images.",
        epilog="Run `qwenfast COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:  # a subcommand still to land: the others work
            if e.name and e.name.startswith(__name__):
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CLIError as e:
        print(f"qwenfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwenfast {args.command}: interrupted", file=sys.stderr)
        return 130
