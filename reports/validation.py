"""One way to check a JSON/TOML document against its declared schema and say what is wrong in one line.

The schemas are pydantic models: ``reports.summary_model`` (summary.json and rows.jsonl rows),
``quantizers.variant_schema`` (variant.json), ``harness.config`` (the audit TOML) and
``harness.store`` (a cached ``meta.json``). Each loader calls :func:`check_schema`, so a wrong type
anywhere is the same kind of error: the file, the field's path, what was expected, what was found,
and the fix, as one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as ``field.path: message (got VALUE)``, plus a count."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg'].rstrip('.').lower()} (got {got}){more}"


def check_schema(model: type[M], data: Any, where: str, fix: str, error: type[Exception]) -> M:
    """``model`` validated from ``data``; ``error(f"{where}: {problem}; {fix}")`` when it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{where}: {describe_validation_error(exc)}; {fix}") from None
