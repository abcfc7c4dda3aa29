"""The one exception type of the quantizers package.

`QuantizerError` subclasses `ValueError`, so the CLI (harness/cli.py) prints its message as one
line and exits with code 2, like `probes.errors.ProbeError` and `reports.errors.ReportError`. It
lives in its own module so that `base.py` (the plugin registry) and `scheme.py` (the scheme
grammar) both raise it without importing each other.
"""


class QuantizerError(ValueError):
    """Bad quantization input: a malformed scheme, an unknown quantizer or option, an unsupported
    model. The message is one line naming the input and the fix; the CLI maps it to exit code 2."""
