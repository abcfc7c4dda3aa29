"""The declared schema of ``summary.json`` and of a ``rows.jsonl`` row: the types readers rely on.

``reports.schema`` says which version a file is and migrates older ones; this module says what a
current one must look like, next to it, so a version bump changes these two files only. Every key
the report, the comparison page, the exports and the gate read is typed here; any other key (new
fields of a later writer, quantizer metadata) passes unchecked (``extra="allow"``), so adding a
field never breaks a reader. Validation is strict about types (a string is never read as a
number) and only checks: the loaded dict is used as written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Number = int | float  # strict mode: never a string or a bool


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Metrics(_Open):
    refusal: dict[str, Number | None] | None = None
    empty: dict[str, Number | None] | None = None
    degenerate: dict[str, Number | None] | None = None
    perplexity: Number | None = None
    perplexity_ratio: Number | None = None


class VariantRecord(_Open):
    name: str
    method: str | None = None
    scheme: str | None = None
    status: str | None = None
    options: dict[str, Any] | None = None
    fingerprint: str | None = None
    quantize_seconds: Number | None = None
    eval_seconds: Number | None = None
    metrics: Metrics | None = None
    counts: dict[str, dict[str, Number | None]] | None = None


class PromptSetInfo(_Open):
    role: str | None = None
    n: int | None = None
    source: str | None = None
    categories: dict[str, int] | None = None


class JudgeInfo(_Open):
    name: str
    primary: bool | None = None


class RateBlock(_Open):
    n: int | None = None
    counts: dict[str, Number | None] | None = None
    refusal: dict[str, Any] | None = None
    empty: dict[str, Any] | None = None
    degenerate: dict[str, Any] | None = None


class CompareBlock(_Open):
    n_pairs: int | None = None
    flips: dict[str, int | dict[str, Any] | None] | None = None
    mcnemar_p: Number | None = None
    refusal_diff: Number | None = None
    refusal_diff_ci95: list[Number | None] | None = None
    reference: dict[str, Any] | None = None
    variant: dict[str, Any] | None = None
    categories: dict[str, Any] | None = None


class Comparison(_Open):
    sets: dict[str, CompareBlock] | None = None
    overall: dict[str, CompareBlock | None] | None = None


class Statistics(_Open):
    reference: str | None = None
    judges: list[str] | None = None
    rates: dict[str, dict[str, dict[str, RateBlock]]] | None = None
    comparisons: dict[str, dict[str, Comparison]] | None = None


class ProbeVariant(_Open):
    name: str | None = None
    max_transfer_drop: Number | None = None


class Probes(_Open):
    variants: list[ProbeVariant] | None = None


class ConfigInfo(_Open):
    variants: list[str] | None = None
    seed: int | None = None


class Summary(_Open):
    """summary.json at the current schema_version (docs/summary-schema.md)."""

    schema_version: int
    created_at: str | None = None
    command: str | None = None
    config: ConfigInfo | None = None
    models: dict[str, dict[str, Any] | str | None] | None = None
    environment: dict[str, Any] | None = None
    prompt_sets: dict[str, PromptSetInfo] | None = None
    judges: list[JudgeInfo] | None = None
    perplexity: dict[str, Any] | None = None
    variants: list[VariantRecord]
    statistics: Statistics | None = None
    first_token: dict[str, Any] | None = None
    probes: Probes | None = None
    wall_seconds: Number | None = None


class JudgeLabel(_Open):
    """One judge's verdict on a row (``rows.jsonl`` ``judges.<name>``)."""

    label: str | None = None
    score: Number | None = None
    matched: str | None = None
    flags: list[str] | None = None


class Row(_Open):
    """One rows.jsonl line: the keys the report, compare and rows.csv index and sort by."""

    variant: str
    set: str
    id: str
    prompt: str | None = None
    response: str | None = None
    category: str | None = None
    label: str | None = None
    judge: str | None = None
    verdict: str | None = None
    score: Number | None = None
    matched: str | None = None
    flags: list[str] | None = None
    judges: dict[str, JudgeLabel] | None = None
    flip: dict[str, str | None] | str | None = None
    hit_max_tokens: bool | None = None
    first_token_refusal_prob: Number | None = None
