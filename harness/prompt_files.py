"""Rows of a prompt file and the one rule that turns rows into prompt records.

Both a plain prompt file (``harness.prompts``) and a benchmark entry (``harness.benchmarks``) are
rows read from a JSONL, CSV or parquet file (or a dataset) and checked the same way by
:func:`build_records`: which column holds each field (:class:`RowRules`), ids present and unique,
prompts non-empty text, labels harmful/benign (safe/unsafe accepted), a missing category
``uncategorised``. A benchmark adds a row filter, a context put in front of the request, a fixed
label and category spellings; a plain file adds a user column mapping whose columns must exist.

Bad input never gives a traceback: every problem raises :class:`harness.errors.UserError` with one
line that names the file (``display``) and the row.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import JsonlLineError, jsonl_objects
from harness.errors import UserError

__all__ = ["DEFAULT_CATEGORY", "LABEL_ALIASES", "SUPPORTED_EXTENSIONS", "RowRules", "as_id", "build_records",
           "column_list", "columns_in", "is_missing", "read_rows", "short"]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".csv", ".parquet")
DEFAULT_CATEGORY = "uncategorised"
#: Label spellings accepted from files (case-insensitive). "safe"/"unsafe" is what XSTest uses,
#: so that file loads without rewriting it.
LABEL_ALIASES: dict[str, str] = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}


# ---------------------------------------------------------------------------------------------
# readers: each returns (rows, where) with where[i] naming row i for error messages


def read_rows(path: Path, display: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``.jsonl``/``.csv``/``.parquet`` file and where each stands (``line 3``, ``row 2``)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, display)
    if suffix == ".csv":
        return _read_csv(path, display)
    if suffix == ".parquet":
        return _read_parquet(path, display)
    raise UserError(f"{display}: unsupported extension {path.suffix or '(none)'!r}; "
                    f"use a {'/'.join(SUPPORTED_EXTENSIONS)} file or a datasets folder")


def _read_jsonl(path: Path, display: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{display}: not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{display}: cannot read ({e.strerror or e})") from None
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    try:
        for lineno, obj in jsonl_objects(text.splitlines()):
            if not isinstance(obj, dict):
                raise UserError(
                    f"{display}: line {lineno} is a JSON {type(obj).__name__}, not an object; write "
                    f'one object per line, e.g. {{"prompt": "..."}}'
                )
            rows.append(obj)
            where.append(f"line {lineno}")
    except JsonlLineError as e:
        raise UserError(f"{display}: line {e.lineno} is not valid JSON ({e.msg}); write one JSON object "
                        "per line") from None
    return rows, where


def _read_csv(path: Path, display: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [dict(r) for r in reader]
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise UserError(f"{display}: not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{display}: malformed CSV ({e}); check its quoting") from None
    except OSError as e:
        raise UserError(f"{display}: cannot read ({e.strerror or e})") from None
    if not header:
        raise UserError(f"{display} is empty: no header row and no prompts; add a header row "
                        f"with a prompt column")
    for r in rows:
        r.pop(None, None)  # surplus fields of a ragged row
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def _read_parquet(path: Path, display: str) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import pandas as pd

        df = pd.read_parquet(path)
    except ImportError:
        raise UserError(
            f"{display}: reading parquet needs pyarrow; run: pip install pyarrow"
        ) from None
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{display}: cannot read parquet ({msg}); check the file") from None
    columns = [str(c) for c in df.columns]
    rows = [dict(zip(columns, vals)) for vals in df.itertuples(index=False, name=None)]
    if not rows:
        return [], []
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


# ---------------------------------------------------------------------------------------------
# values


def columns_in(rows: list[dict]) -> list[str]:
    """Every column name that occurs in `rows`, in first-seen order (rows may differ in keys)."""
    found: dict[str, None] = {}
    for row in rows:
        found.update(dict.fromkeys(row))
    return list(found)


def is_missing(value: Any) -> bool:
    """None, NaN (a blank parquet/pandas cell) or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def as_id(value: Any) -> str | None:
    """Ids may be strings or integers (CSV/parquet row numbers); anything else is an error."""
    if isinstance(value, bool) or is_missing(value):
        return None
    if isinstance(value, str):
        return value.strip()
    try:
        if isinstance(value, numbers.Integral):
            return str(int(value))
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return str(int(value))
    except (TypeError, ValueError):
        return None
    return None


def short(value: Any, n: int = 40) -> str:
    """repr() cut to n characters: keeps error messages on one line."""
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def column_list(cols: Sequence[str]) -> str:
    """Column names for a message (``none`` for no columns)."""
    return ", ".join(str(c) for c in cols) if cols else "none"


# ---------------------------------------------------------------------------------------------
# the row builder

#: Fields a record can take from a column.
RECORD_FIELDS: tuple[str, ...] = ("prompt", "id", "category", "label", "context", "target")


@dataclass(frozen=True)
class RowRules:
    """How rows become records.

    ``columns``: per field, the columns tried in order (the first present wins; a field without
    an entry reads the column of its own name for prompt/id/category/label). ``required``: fields
    whose column must be present (a user's mapping, a benchmark's explicit id/label). ``role``:
    the set's role (None: inferred, harmful when every label is). ``label``: one label for every
    record. ``where``: keep rows whose column value is listed (only for columns present).
    ``context_template``: how a non-empty context is put in front of the request.
    ``category_aliases``: category spellings folded into one.
    """

    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    role: str | None = None
    label: str | None = None
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    context_template: str = "{context}\n\n---\n\n{prompt}"
    category_aliases: Mapping[str, str] = field(default_factory=dict)

    def candidates(self, fld: str) -> tuple[str, ...]:
        if fld in self.columns:
            return tuple(self.columns[fld])
        return (fld,) if fld in ("prompt", "id", "category", "label") else ()


@dataclass(frozen=True)
class BuiltRows:
    """What :func:`build_records` found: one field dict per kept row, the rows the filter left out,
    and the role (given or inferred)."""

    records: list[dict[str, str]]
    n_filtered: int
    role: str


def build_records(rows: list[dict[str, Any]], where: Sequence[str], rules: RowRules, *, name: str,
                  display: str) -> BuiltRows:
    """Check ``rows`` (``where[i]`` names row i) against ``rules`` and return one dict per kept row:
    ``id``, ``prompt`` (context in front when there is one), ``category``, ``label``, ``behavior``
    (the request alone), ``context``, ``target``. A row without an id column gets ``<name>-<i>``
    (``i`` counted over every row, filtered ones too)."""
    if not rows:
        raise UserError(f"{display} is empty: it has no prompts; add at least one row")
    found = columns_in(rows)
    cols = {f: next((c for c in rules.candidates(f) if c in found), None) for f in RECORD_FIELDS}
    missing = [f"{f}={'|'.join(rules.candidates(f))}" for f in rules.required if cols[f] is None]
    # a mapped prompt column that is missing is a mapping error; an unmapped one, a missing prompt column
    if missing and (cols["prompt"] is not None or "prompt" in rules.required):
        raise UserError(f"{display}: column mapping {', '.join(missing)} names column(s) not in the "
                        f"file (found: {column_list(found)}); fix the mapping")
    if cols["prompt"] is None:
        wanted = " or ".join(repr(c) for c in rules.candidates("prompt"))
        mapped = {c for f in RECORD_FIELDS for c in rules.candidates(f)}
        example = next((c for c in found if c not in mapped), None) or "COLUMN"
        raise UserError(f"{display}: no prompt column {wanted} (found: {column_list(found)}); map the prompt "
                        f"column, e.g. prompt={example}")
    if cols["label"] is None and rules.role is None and rules.label is None:
        raise UserError(
            f"{display}: no {rules.candidates('label')[0]!r} column (found: {column_list(found)}) and no role; "
            f"prefix the path with a role (harmful=PATH, benign=PATH or overrefusal=PATH) or "
            f"map a label column, e.g. label=COLUMN"
        )
    active = {c: v for c, v in rules.where.items() if c in found}
    role_label = "harmful" if rules.role == "harmful" else "benign"

    records: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    n_filtered = 0
    for i, (row, loc) in enumerate(zip(rows, where)):
        if any(str(row.get(c, "")).strip() not in allowed for c, allowed in active.items()):
            n_filtered += 1
            continue
        behavior = row.get(cols["prompt"])
        if not isinstance(behavior, str):
            raise UserError(f"{display}: {loc} has a non-string prompt ({short(behavior)}, "
                            f"{type(behavior).__name__}); every prompt must be text")
        if not behavior.strip():
            raise UserError(f"{display}: {loc} has an empty prompt; remove the row or fill it in")
        context = row.get(cols["context"]) if cols["context"] else None
        context = "" if is_missing(context) else str(context)
        prompt = rules.context_template.format(context=context, prompt=behavior) if context else behavior
        if cols["id"]:
            rid = as_id(row.get(cols["id"]))
            if rid is None:
                raise UserError(f"{display}: {loc} has a missing or invalid id ({short(row.get(cols['id']))}); "
                                f"every id must be a non-empty string or integer")
        else:
            rid = f"{name}-{i}"
        if rid in seen:
            raise UserError(f"{display}: duplicate id {rid!r} ({seen[rid]} and {loc}); ids must be unique")
        seen[rid] = loc
        category = DEFAULT_CATEGORY
        if cols["category"] and not is_missing(row.get(cols["category"])):
            category = str(row.get(cols["category"])).strip() or DEFAULT_CATEGORY
        category = rules.category_aliases.get(category, category)
        if rules.label is not None:
            label = rules.label
        elif cols["label"]:
            raw = row.get(cols["label"])
            label = LABEL_ALIASES.get(raw.strip().lower()) if isinstance(raw, str) else None
            if label is None:
                raise UserError(f"{display}: {loc} has invalid label {short(raw)}; use harmful or benign "
                                f"(unsafe/safe are accepted too)")
        else:
            label = role_label
        target = row.get(cols["target"]) if cols["target"] else ""
        records.append({"id": rid, "prompt": prompt, "category": category, "label": label, "behavior": behavior,
                        "context": context, "target": "" if is_missing(target) else str(target)})
    if not records:
        raise UserError(f"{display}: no rows left after the row filter {dict(rules.where)}; is this the right file?")
    role = rules.role or ("harmful" if all(r["label"] == "harmful" for r in records) else "benign")
    return BuiltRows(records, n_filtered, role)
