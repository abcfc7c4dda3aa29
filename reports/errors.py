"""The error type of the reports package (the CLI maps it to one line and exit code 2)."""


class ReportError(ValueError):
    """A run directory that cannot be read; the message is one line naming the file and the fix."""
