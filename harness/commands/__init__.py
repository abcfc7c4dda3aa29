"""One module per `safequant` subcommand; each exposes `register(subparsers)`.

To add a command, write a module here with a `register` function and list it in `COMMANDS`.
"""

COMMANDS = ("audit", "quantize", "list", "report", "compare", "gate", "probe", "judges", "benchmarks", "export")
