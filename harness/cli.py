"""The `safequant` command line.

Every user-facing failure is one line, `safequant: error: ...`, and exit code 2; a Ctrl-C says how
to resume. The subcommands live in `harness/commands/`, one module each.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.allocator import tune_glibc_malloc
from harness.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from harness import __version__
    from harness.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="safequant", description="Safety audits for quantized LLMs: "
                                     "refusal, over-refusal and perplexity side by side.")
    parser.add_argument("--version", action="version", version=f"safequant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"harness.commands.{name}").register(sub)
    return parser


def _is_library_input_error(exc: ValueError) -> bool:
    """Bad-input errors of our own packages (QuantizerError, ReportError, ...) subclass ValueError."""
    return type(exc).__module__.split(".")[0] in {"quantizers", "reports", "probes", "harness"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    tune_glibc_malloc()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"safequant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        if _is_library_input_error(exc):
            print(f"safequant: error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("safequant: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
