"""`qwenfast` command line: one module per subcommand (decode, bench, generate).

Each subcommand module defines `add_parser(subparsers)` (registers its parser, sets `run` as the
handler) and `run(args) -> int`. Bad input raises `CLIError`; `main` prints it, and every other failure
it knows (out of memory, another rank's failure, a lost rank, a file-system error:
`common.one_line_error`), as one line on stderr and exits 2, never a traceback. Bugs keep their
traceback; `--debug` or QWENFAST_DEBUG=1 shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import common
from .common import Reported, one_line_error

SUBCOMMANDS = ("decode", "bench", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenfast",
        description="Fast Qwen-Image inference: decode latents, benchmark the VAE, generate images.",
        epilog="Run `qwenfast COMMAND --help` for the options of each command.\n\n"
               "exit status: 0 done; 2 an error, told in one line on stderr (`qwenfast COMMAND: error: ...`):\n"
               "bad input, out of memory, a write failure, another rank's failure under torchrun;\n"
               "130 interrupted (nothing half-written is left). --debug or QWENFAST_DEBUG=1: tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        sub.choices[name].add_argument(
            "--debug", action="store_true",
            help="show the traceback of a failure instead of one line (also: QWENFAST_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("QWENFAST_DEBUG", "") not in ("", "0")
    common.COMMAND = f"qwenfast {args.command}"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"qwenfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the known ones become one line, the rest re-raised
        if isinstance(e, Reported) and not debug:
            return 2  # every rank has printed its line already
        line = None if debug else one_line_error(e)
        if line is None:
            e.__suppress_context__ = False  # a CLIError raised `from None`: show what it replaced
            raise
        common.report(line)
        return 2
