"""safequant reports: renders a run directory into a self-contained HTML audit report.

Also home of the gate's thresholds and verdicts (`reports.verdicts`), so the report and
`safequant gate` decide from one definition, and of the CSV exports.
"""

from .errors import ReportError
from .render import ReportOptions, render
from .run import Run, load_run
from .schema import SCHEMA_VERSION
from .verdicts import Thresholds, ThresholdError, evaluate

__all__ = ["SCHEMA_VERSION", "ReportError", "ReportOptions", "Run", "ThresholdError", "Thresholds", "evaluate",
           "load_run", "render"]
