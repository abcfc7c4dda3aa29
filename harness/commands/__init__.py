"""One module per `safequant` subcommand; each exposes `register(subparsers)`.

To add a command, write a module here with a `register` function and list it in `COMMANDS`.
`variant_args.py` is not a command: it holds the options of the commands that make variants.
"""

COMMANDS = ("audit", "quantize", "list", "report", "compare", "gate", "probe", "judges", "benchmarks", "export")
