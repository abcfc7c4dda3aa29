"""Judges measured against human labels: labelled tables, agreement figures, grouped cross-validation.

Why: a judge's accuracy on responses written by the same hands as its rules says little (issue 16).
This module reads third-party labelled completions (CSV, JSONL or parquet with a column mapping;
XSTest v2's completion files load as they are), scores any judge on them per source (model
family) and pooled, and cross-validates the trained judge with folds grouped by prompt, so that no
prompt is in a training and a test fold at once.

The outcome is binary: **refused** (full or partial refusal; a judge's ``partial_refusal`` flag
counts, as XSTest's annotators count partial refusals) or not. The project's own files also have
exact labels (empty and degenerate included), scored by :func:`validate_judge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_DATA = Path(__file__).resolve().parents[1] / "data"
#: The project's labelled responses: a validation set and the older classifier's training set.
VALIDATION_FILE = _DATA / "judge_validation.jsonl"
TRAIN_FILE = _DATA / "judge_train.jsonl"

#: Column names tried in order for each field, so XSTest's files and the project's JSONL both load.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "behavior"),
    "response": ("response", "completion", "generation", "output"),
    "label": ("label", "final_label", "gold"),
    "source": ("source", "model", "family"),
    "group": ("group", "prompt_id", "id"),
}
#: Label values -> (label, partial). XSTest v2: 1 full compliance, 2 full refusal, 3 partial refusal.
LABEL_VALUES: dict[str, tuple[str, bool]] = {
    "1_full_compliance": ("compliance", False), "2_full_refusal": ("refusal", False),
    "3_partial_refusal": ("refusal", True), "full_compliance": ("compliance", False),
    "full_refusal": ("refusal", False), "partial_refusal": ("refusal", True),
    "refusal": ("refusal", False), "compliance": ("compliance", False), "refused": ("refusal", False),
    "complied": ("compliance", False), "empty": ("empty", False), "degenerate": ("degenerate", False),
    "1": ("refusal", False), "0": ("compliance", False), "true": ("refusal", False), "false": ("compliance", False),
}


def parse_columns(text: str | None) -> dict[str, str]:
    """``FIELD=COLUMN,...`` (fields prompt, response, label, source, group) -> mapping."""
    from harness.errors import UserError

    from common.keyvalue import key_value_items

    def bad(item: str) -> UserError:
        return UserError(f"--columns item {item!r}: use FIELD=COLUMN with FIELD one of {', '.join(DEFAULT_COLUMNS)}")

    out: dict[str, str] = {}
    for item, key, value in key_value_items(text or "", bad):
        if key not in DEFAULT_COLUMNS:
            raise bad(item)
        out[key] = value
    return out


def load_labelled(path: str | Path = VALIDATION_FILE, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Labelled responses from a CSV/JSONL/parquet file (the project's JSONL files, XSTest's CSV
    completions, any table with a column mapping): dicts with id, prompt, response, label
    (refusal|compliance|empty|degenerate), partial, source, group, kind, prompt_label and
    hit_max_tokens (None when the file does not say)."""
    from harness.prompt_files import read_rows
    from harness.errors import UserError

    p = Path(path)
    display = f"labelled response file {path}"
    if not p.is_file():
        raise UserError(f"{display}: no such file; pass a CSV, JSONL or parquet file")
    rows, _ = read_rows(p, display)
    if not rows:
        raise UserError(f"{display}: no rows")
    header = list(rows[0])
    chosen: dict[str, str | None] = {}
    for fld, cands in DEFAULT_COLUMNS.items():
        given = (columns or {}).get(fld)
        if given is not None and given not in header:
            raise UserError(f"{display}: no column {given!r} for {fld} (columns: {', '.join(header)})")
        chosen[fld] = given or next((c for c in cands if c in header), None)
    missing = [f for f in ("response", "label") if chosen[f] is None]
    if missing:
        raise UserError(f"{display}: no {' or '.join(missing)} column (columns: {', '.join(header)}); "
                        f"map them with --columns response=COL,label=COL")
    items = []
    for n, row in enumerate(rows, 1):
        raw = str(row[chosen["label"]]).strip().lower()
        if raw not in LABEL_VALUES:
            raise UserError(f"{display}: row {n} has label {row[chosen['label']]!r}; expected one of "
                            f"{', '.join(sorted(LABEL_VALUES))}")
        label, partial = LABEL_VALUES[raw]
        response = row[chosen["response"]]
        if isinstance(response, float) and math.isnan(response):
            response = None  # an empty CSV or parquet cell: an empty response
        for fld, value in (("prompt", row[chosen["prompt"]] if chosen["prompt"] else ""), ("response", response)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{display}: row {n} has a {fld} that is not text ({value!r}); {fld}s must be strings")
        item = {"prompt": row[chosen["prompt"]] or "" if chosen["prompt"] else "",
                "response": response or "",
                "label": label, "partial": partial or row.get("kind") == "partial_refusal",
                "source": str(row[chosen["source"]]) if chosen["source"] else p.stem,
                "kind": str(row.get("kind") or row.get("type") or ""),
                "prompt_label": str(row.get("prompt_label") or ""), "id": str(row.get("id") or n),
                "hit_max_tokens": row.get("hit_max_tokens")}
        item["group"] = str(row[chosen["group"]]) if chosen["group"] else item["prompt"]
        items.append(item)
    return items


def _expected(item: Mapping[str, Any], axis: str) -> str | None:
    """The label a judge on ``axis`` should give a gold item (None: not applicable)."""
    gold = item["label"]
    if axis == "refusal" or gold in ("empty", "degenerate"):
        return gold
    if (item.get("prompt_label") or "harmful") != "harmful":
        return None  # harm judges say nothing about over-refusal
    return {"refusal": "harmless", "compliance": "harmful"}[gold]


def validate_judge(judge, items: Sequence[Mapping[str, Any]]) -> dict:
    """Accuracy (exact label, over applicable items), and precision/recall/F1 of the judge's
    positive class (refusal, or harmful for harm judges) over the binary items; unparsed counted."""
    axis = getattr(judge, "axis", "refusal")
    positive = "refusal" if axis == "refusal" else "harmful"
    verdicts = judge.judge_many([it["prompt"] for it in items], [it["response"] for it in items],
                                [{"hit_max_tokens": it.get("hit_max_tokens")} for it in items])
    rows = []
    for it, v in zip(items, verdicts):
        exp = _expected(it, axis)
        if exp is None:
            continue
        rows.append((it, exp, v.label))
    n = len(rows)
    correct = sum(exp == got for _, exp, got in rows)
    tp = sum(exp == positive and got == positive for _, exp, got in rows)
    fp = sum(exp != positive and got == positive for _, exp, got in rows)
    fn = sum(exp == positive and got != positive for _, exp, got in rows)
    binary = [(exp, got) for _, exp, got in rows if exp in ("refusal", "compliance", "harmful", "harmless")]
    bin_correct = sum((exp == positive) == (got == positive) for exp, got in binary)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp and not math.isnan(precision + recall) else 0.0
    by_kind: dict[str, list[int]] = {}
    for it, exp, got in rows:
        by_kind.setdefault(it.get("kind") or "?", [0, 0])
        by_kind[it.get("kind") or "?"][0] += exp == got
        by_kind[it.get("kind") or "?"][1] += 1
    errors = [{"id": it.get("id"), "kind": it.get("kind"), "expected": exp, "got": got}
              for it, exp, got in rows if exp != got]
    return {
        "judge": judge.name, "axis": axis, "n": n, "accuracy": correct / n if n else float("nan"),
        "binary_n": len(binary), "binary_accuracy": bin_correct / len(binary) if binary else float("nan"),
        "positive": positive, "precision": precision, "recall": recall, "f1": f1,
        "tp": tp, "fp": fp, "fn": fn, "unparsed": sum(got == "unparsed" for _, _, got in rows),
        "by_kind": {k: {"correct": c, "n": t, "accuracy": c / t} for k, (c, t) in sorted(by_kind.items())},
        "errors": errors,
    }



def gold_refused(item: Mapping[str, Any]) -> int | None:
    """1 refused (full or partial), 0 not, None when the gold label is empty/degenerate (left out)."""
    if item["label"] in ("empty", "degenerate"):
        return None
    return int(item["label"] == "refusal" or bool(item.get("partial")))


def judged_refused(judgement) -> int:
    """A judgement on the refused/not axis: refusal, or a partial refusal flagged by the judge."""
    return int(judgement.label == "refusal" or "partial_refusal" in judgement.flags)


def agreement_figures(gold: Sequence[int], pred: Sequence[int]) -> dict:
    """Accuracy, refusal precision/recall, Cohen's kappa and the confusion counts of two 0/1 lists."""
    g, p = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    n = len(g)
    tp, fp = int(((g == 1) & (p == 1)).sum()), int(((g == 0) & (p == 1)).sum())
    fn, tn = int(((g == 1) & (p == 0)).sum()), int(((g == 0) & (p == 0)).sum())
    acc = (tp + tn) / n if n else float("nan")
    expected = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n) if n else float("nan")
    kappa = (acc - expected) / (1 - expected) if n and expected < 1 else float("nan")
    return {"n": n, "accuracy": acc, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"), "kappa": kappa,
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def per_source(items: Sequence[Mapping[str, Any]], pred: Sequence[int]) -> dict[str, dict]:
    """:func:`agreement_figures` per ``source`` and pooled (key ``all``), over items with a binary gold."""
    keep = [(it, p) for it, p in zip(items, pred, strict=True) if gold_refused(it) is not None]
    out = {}
    for src in sorted({it["source"] for it, _ in keep}):
        sel = [(it, p) for it, p in keep if it["source"] == src]
        out[src] = agreement_figures([gold_refused(it) for it, _ in sel], [p for _, p in sel])
    out["all"] = agreement_figures([gold_refused(it) for it, _ in keep], [p for _, p in keep])
    return out


def judge_items(judge, items: Sequence[Mapping[str, Any]]) -> list[int]:
    """The judge's refused/not outcome for every item."""
    verdicts = judge.judge_many([it["prompt"] for it in items], [it["response"] for it in items])
    return [judged_refused(v) for v in verdicts]


def grouped_cv_predictions(items: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]], *,
                           encoder, folds: int = 5, C: float = 1.0, seed: int = 0) -> list[int]:
    """Refused/not for every item from a head trained without the item's prompt group.

    Each fold's head learns from ``extra`` (the project's own labelled files and templated styles)
    plus the items of the other folds; folds are grouped by ``group`` (sklearn GroupKFold), so the
    same prompt is never in training and test at once. The encoder runs once over all texts.
    """
    from sklearn.model_selection import GroupKFold

    from .trained import RefusalModelJudge, feature_names, features, fit_head, training_target

    extra = [e for e in extra if training_target(e) is not None]
    X_items = features(encoder, [it["response"] for it in items])
    X_extra = features(encoder, [e["response"] for e in extra])
    y_items = np.array([gold_refused(it) if gold_refused(it) is not None else -1 for it in items])
    y_extra = np.array([training_target(e) for e in extra])
    names = feature_names(encoder.dim)
    pred = [0] * len(items)
    groups = [it["group"] for it in items]
    for train_idx, test_idx in GroupKFold(n_splits=folds).split(X_items, groups=groups):
        train_idx = [i for i in train_idx if y_items[i] >= 0]
        X = np.concatenate([X_extra, X_items[train_idx]])
        y = np.concatenate([y_extra, y_items[train_idx]])
        judge = RefusalModelJudge.from_parts(fit_head(X, y, names, C=C, seed=seed), encoder)
        test = [items[i] for i in test_idx]
        for i, v in zip(test_idx, judge.judge_many([t["prompt"] for t in test], [t["response"] for t in test])):
            pred[i] = judged_refused(v)
    return pred


#: Each judge's measured sensitivity and specificity (XSTest v2 dev split), used for the corrected
#: rates in every audit; written by ``safequant judges --validate FILE --save-errors PATH``.
ERRORS_FILE = _DATA / "judge_errors.json"


def error_profile(figures: Mapping[str, Any], *, data: str, method: str) -> dict:
    """A judge's error profile from pooled :func:`agreement_figures`: sensitivity tp / (tp + fn) and
    specificity tn / (tn + fp) as counts, with the data and method they were measured with."""
    return {"sensitivity": {"k": figures["tp"], "n": figures["tp"] + figures["fn"]},
            "specificity": {"k": figures["tn"], "n": figures["tn"] + figures["fp"]},
            "data": data, "method": method}


def load_error_profiles(path: str | Path = ERRORS_FILE) -> dict[str, dict]:
    """``{judge name: error profile}``; empty when the file is missing (no correction is shown)."""
    import json

    p = Path(path)
    if not p.is_file():
        return {}
    return json.loads(p.read_text(encoding="utf-8"))["judges"]
