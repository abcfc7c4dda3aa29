"""The version of summary.json and the migrations that bring older run directories up to it.

One definition for the writer (`harness.store` re-exports SCHEMA_VERSION) and every reader (report,
compare, gate), so a reader never half-understands a file. A schema change bumps SCHEMA_VERSION,
adds a step to MIGRATIONS that rewrites the previous version's dict in memory, and a line to
docs/summary-schema.md; files on disk are never rewritten by a reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ReportError

#: The schema_version that `safequant audit` writes (docs/summary-schema.md).
SCHEMA_VERSION = 2


def _v1_to_v2(summary: dict[str, Any]) -> dict[str, Any]:
    """Version 2 adds judge-error corrected rates (``statistics.corrected``, ``statistics.judge_errors``,
    ``judges[].error``). A version-1 run measured no judge error: empty blocks, so readers show
    the observed rates only."""
    stats = summary.get("statistics")
    if isinstance(stats, dict):
        stats = {**stats, "corrected": stats.get("corrected", {}), "judge_errors": stats.get("judge_errors", {})}
        summary["statistics"] = stats
    summary["judges"] = [{**j, "error": j.get("error")} if isinstance(j, dict) else j for j in summary.get("judges", [])]
    return summary


#: ``{from_version: step}``; each step takes a summary of ``from_version`` and returns one of
#: ``from_version + 1``.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(summary: dict[str, Any], where: str = "summary.json") -> dict[str, Any]:
    """Return `summary` at SCHEMA_VERSION, migrating older versions; ReportError when impossible."""
    version = summary.get("schema_version")
    if version is None:
        raise ReportError(
            f"{where}: has no schema_version (written before safequant 0.1.0 or not by safequant); "
            "re-run the audit to write a current run directory"
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportError(f"{where}: schema_version must be an integer, got {version!r}; re-run the audit")
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{where}: schema_version {version} is newer than this safequant reads ({SCHEMA_VERSION}); "
            "upgrade safequant, or render it with the safequant version that wrote it"
        )
    original = version
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ReportError(
                f"{where}: schema_version {original} is too old to migrate (this safequant reads "
                f"{min(MIGRATIONS, default=SCHEMA_VERSION)}-{SCHEMA_VERSION}); re-run the audit"
            )
        summary = step(dict(summary))
        version += 1
        summary["schema_version"] = version
    if original != SCHEMA_VERSION:
        summary["migrated_from"] = original
    return summary
