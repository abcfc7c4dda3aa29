"""Prompt sets: the built-in held-out sets and user files (JSONL, CSV, parquet).

Every audit scores a model on named prompt sets. Each set has a *role* that says which answer is
right: ``harmful`` (refusing is right), ``benign`` and ``overrefusal`` (refusing is wrong). Each
record carries its own ``label`` (``harmful`` or ``benign``) as well, so a mixed file such as
XSTest keeps its per-prompt truth. Files are read, and their rows checked, by
:mod:`harness.prompt_files` (the row builder benchmark entries use too).

Bad input never gives a traceback: every problem raises :class:`harness.errors.UserError` with
one line that names the set or file and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.keyvalue import key_value_items
from harness.errors import UserError
from harness.prompt_files import (DEFAULT_CATEGORY, SUPPORTED_EXTENSIONS, RowRules, build_records, columns_in,
                                  read_rows)

__all__ = [
    "BUILTIN_SETS",
    "FIELDS",
    "LABELS",
    "PROMPT_DIR",
    "PromptRecord",
    "PromptSet",
    "ROLES",
    "SUPPORTED_EXTENSIONS",
    "list_prompt_sets",
    "load_prompt_set",
    "parse_column_map",
    "split_role",
]

PROMPT_DIR = Path(__file__).resolve().parent / "data" / "prompts"

ROLES: tuple[str, ...] = ("harmful", "benign", "overrefusal")
LABELS: tuple[str, ...] = ("harmful", "benign")
# Record fields a column mapping may target.
FIELDS: tuple[str, ...] = ("id", "prompt", "category", "label")

# name -> (file under PROMPT_DIR, role)
BUILTIN_SETS: dict[str, tuple[str, str]] = {
    "harmful": ("harmful.jsonl", "harmful"),
    "benign": ("benign.jsonl", "benign"),
    "overrefusal": ("overrefusal.jsonl", "overrefusal"),
}

_DESCRIPTIONS: dict[str, str] = {
    "harmful": "hand-written harmful requests over 13 harm categories (refusing is right)",
    "benign": "hand-written everyday requests over 10 topics (refusing is wrong)",
    "overrefusal": "safe requests that look dangerous: homonyms, figurative language, "
    "safe targets and contexts, definitions, history, public/fictional figures "
    "(refusing is wrong)",
}


@dataclass(frozen=True, slots=True)
class PromptRecord:
    """One prompt with its truth label; ``id`` is stable so results can be cached and resumed."""

    id: str
    prompt: str
    category: str
    label: str  # "harmful" | "benign"


@dataclass(frozen=True, slots=True)
class PromptSet:
    """A named, validated list of prompts with the role that decides what a right answer is."""

    name: str
    role: str  # "harmful" | "benign" | "overrefusal"
    source: str  # "builtin:<name>" or the file path as resolved
    records: tuple[PromptRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    @property
    def categories(self) -> dict[str, int]:
        """Number of prompts per category, in first-seen order."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.category] = counts.get(r.category, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------
# public API


def parse_column_map(items: str | Sequence[str] | None) -> dict[str, str]:
    """Parse ``"prompt=goal,category=type"`` (or a list of ``FIELD=COLUMN``) into a mapping.

    The CLI passes user strings through this so a typo fails with one line, not a KeyError.
    """
    if items is None:
        return {}

    def bad(item: str) -> UserError:
        return UserError(f"column mapping {item.strip()!r} is not FIELD=COLUMN; write e.g. prompt=goal "
                         f"(fields: {', '.join(FIELDS)})")

    mapping: dict[str, str] = {}
    for item, field, column in key_value_items(items, bad):
        if not field or not column:
            raise bad(item)
        mapping[field] = column
    _check_column_map(mapping, "column mapping")
    return mapping


def load_prompt_set(
    spec: str,
    column_map: Mapping[str, str] | None = None,
    limit: int | None = None,
    *,
    role: str | None = None,
) -> PromptSet:
    """Load a built-in set by name, or a ``.jsonl``/``.csv``/``.parquet`` file.

    ``spec`` forms: ``harmful`` (built-in), ``path/to/file.csv`` (role inferred from the label
    column: all harmful -> ``harmful``, else ``benign``), or ``ROLE=path/to/file.csv`` to give
    the role explicitly (needed when the file has no label column; every record then gets the
    label the role implies). ``role=`` does the same as the prefix.

    ``column_map`` maps record fields to file columns, e.g. ``{"prompt": "goal"}`` for AdvBench.
    Missing ``category`` becomes ``"uncategorised"``; missing ``id`` becomes ``<name>-<row>``
    (row counted from 0). ``limit`` keeps the first N records after validation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"prompt set {spec!r} is empty; pass a built-in name ({_known()}) "
            f"or a path to a {_exts()} file"
        )
    spec = spec.strip()
    display = spec
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"prompt set {display!r}: limit must be a positive integer, got {limit!r}")
    if role is not None and role not in ROLES:
        raise UserError(
            f"prompt set {display!r}: unknown role {role!r}; use one of {', '.join(ROLES)}"
        )

    prefix, target = split_role(spec)
    if prefix is not None:
        if role is not None and role != prefix:
            raise UserError(
                f"prompt set {display!r}: role {prefix!r} in the spec contradicts role "
                f"{role!r} passed separately; give only one"
            )
        role = prefix

    if target in BUILTIN_SETS:
        if column_map:
            raise UserError(
                f"prompt set {display!r} is built-in; a column mapping only applies to files, "
                f"so drop it"
            )
        file, builtin_role = BUILTIN_SETS[target]
        rows, where = read_rows(PROMPT_DIR / file, f"built-in set {target!r}")
        pset = _prompt_set(rows, where, {}, name=target, role=role or builtin_role, source=f"builtin:{target}",
                           display=f"built-in set {target!r}")
        return _limited(pset, limit)

    path = Path(target).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        if suffix not in SUPPORTED_EXTENSIONS:
            raise UserError(
                f"unknown prompt set {target!r}: not a built-in set ({_known()}) and no such "
                f"file; pass a built-in name or a path to a {_exts()} file"
            )
        raise UserError(
            f"prompt set file not found: {target}; check the path (relative paths are taken "
            f"from {Path.cwd()}) or use a built-in set ({_known()})"
        )
    if path.is_dir():
        raise UserError(
            f"prompt set {target!r} is a directory; pass a {_exts()} file inside it"
        )
    if suffix not in SUPPORTED_EXTENSIONS:
        raise UserError(
            f"prompt set file {target}: unsupported extension {path.suffix or '(none)'!r}; "
            f"convert it to {_exts()}"
        )

    display = f"prompt set file {target}"
    cmap = dict(column_map or {})
    _check_column_map(cmap, display)
    rows, where = read_rows(path, display)
    pset = _prompt_set(rows, where, cmap, name=path.stem, role=role, source=str(path.resolve()), display=display)
    return _limited(pset, limit)


def list_prompt_sets() -> list[tuple[str, str, int, str]]:
    """``(name, role, n, description)`` for each built-in set, for ``safequant list``."""
    out: list[tuple[str, str, int, str]] = []
    for name, (_, role) in BUILTIN_SETS.items():
        out.append((name, role, len(load_prompt_set(name)), _DESCRIPTIONS.get(name, "")))
    return out


def split_role(spec: str) -> tuple[str | None, str]:
    """``ROLE=PATH`` -> ``(ROLE, PATH)``, the one reading of a role prefix (a path that exists is
    taken whole even when it holds ``=``); ``(None, spec)`` without one. Raises :class:`UserError`
    when the part before ``=`` is not a role or nothing follows it."""
    if "=" not in spec or Path(spec).expanduser().exists():
        return None, spec
    prefix, _, rest = spec.partition("=")
    prefix, rest = prefix.strip(), rest.strip()
    if prefix not in ROLES:
        raise UserError(
            f"prompt set {spec!r}: {prefix!r} before '=' is not a role; write "
            f"ROLE=PATH with ROLE one of {', '.join(ROLES)} (e.g. harmful=my_prompts.csv)"
        )
    if not rest:
        raise UserError(
            f"prompt set {spec!r}: nothing after '='; write {prefix}=PATH to a "
            f"{_exts()} file"
        )
    return prefix, rest


def _prompt_set(rows: list[dict[str, Any]], where: list[str], column_map: Mapping[str, str], *, name: str,
                role: str | None, source: str, display: str) -> PromptSet:
    """Rows checked by the one row builder (:func:`harness.prompt_files.build_records`) as a PromptSet."""
    rules = RowRules(columns={f: (c,) for f, c in column_map.items()}, required=tuple(column_map), role=role)
    built = build_records(rows, where, rules, name=name, display=display)
    records = tuple(PromptRecord(id=r["id"], prompt=r["prompt"], category=r["category"], label=r["label"])
                    for r in built.records)
    return PromptSet(name=name, role=built.role, source=source, records=records)


def _limited(pset: PromptSet, limit: int | None) -> PromptSet:
    if limit is None or limit >= len(pset.records):
        return pset
    return PromptSet(pset.name, pset.role, pset.source, pset.records[:limit])


def _check_column_map(cmap: Mapping[str, str], display: str) -> None:
    for field, column in cmap.items():
        if field not in FIELDS:
            raise UserError(
                f"{display}: column mapping key {field!r} is not a field; map one of "
                f"{', '.join(FIELDS)} (e.g. prompt=goal)"
            )
        if not isinstance(column, str) or not column:
            raise UserError(
                f"{display}: column mapping {field}={column!r} must name a column, e.g. prompt=goal"
            )


def _known() -> str:
    return ", ".join(BUILTIN_SETS)


def _exts() -> str:
    return "/".join(SUPPORTED_EXTENSIONS)
