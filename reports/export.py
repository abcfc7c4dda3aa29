"""CSV exports of a run: one row per variant (the summary table) and one row per prompt.

For spreadsheets and dashboards that do not read JSON. The numbers come from the same functions
as the report and the gate (reports.run, reports.verdicts), so the three never disagree.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from .errors import ReportError
from .run import (ROLE_ORDER, Run, _one_line, comparison, perplexity, perplexity_ratio, primary_judge,
                  prompt_sets, role_rate, set_rate, write_atomic)
from .verdicts import Thresholds, evaluate

log = logging.getLogger(__name__)

#: Per-prompt columns in this order; then one `judge:<name>` column per judge.
ROW_COLUMNS = ("variant", "set", "benchmark", "id", "category", "label", "judge", "verdict", "score",
               "matched", "flip", "hit_max_tokens", "first_token_refusal_prob", "prompt", "response")


#: A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: text cells starting like a formula get a leading
    single quote (OWASP's advice; prompts and model output are untrusted). Numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([_cell(h) for h in header])
    w.writerows([_cell(v) for v in r] for r in rows)
    return buf.getvalue()


def variants_table(run: Run, thresholds: Thresholds | None = None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of variants.csv: rates per set and role, perplexity, paired test, verdict."""
    sets = prompt_sets(run)
    roles = [r for r in ROLE_ORDER if any(s.role == r for s in sets)]
    verdicts = {v.variant: v for v in evaluate(run, thresholds)}
    header = (["variant", "method", "scheme", "status", "verdict", "verdict_reason"]
              + [f"refusal:{s.name}" for s in sets] + [f"refusal_role:{r}" for r in roles]
              + ["perplexity", "perplexity_ratio", "harmful_refusal_lost", "harmful_mcnemar_p",
                 "quantize_seconds", "eval_seconds"])
    rows = []
    for v in run.variants:
        name = str(v["name"])
        harm = comparison(run, name, sets, "harmful") or {}
        verdict = verdicts.get(name)
        rows.append([name, v.get("method"), v.get("scheme"), v.get("status"),
                     verdict.status if verdict else "", verdict.reason if verdict else ""]
                    + [set_rate(v, s.name) for s in sets] + [role_rate(v, sets, r) for r in roles]
                    + [perplexity(v), perplexity_ratio(v, run.reference),
                       (harm.get("flips") or {}).get("refusal_lost"), harm.get("mcnemar_p"),
                       v.get("quantize_seconds"), v.get("eval_seconds")])
    return header, rows


def rows_table(run: Run) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of rows.csv: rows.jsonl flattened, every judge's label as a column."""
    judges: list[str] = []
    for r in run.rows:
        for j in r.get("judges") or {}:
            if j not in judges:
                judges.append(j)
    primary = primary_judge(run)
    out = []
    for r in run.rows:
        flat = dict(r)
        flat["flip"] = (r.get("flip") or {}).get(primary) if isinstance(r.get("flip"), dict) else r.get("flip")
        labels = [((r.get("judges") or {}).get(j) or {}).get("label") for j in judges]
        out.append([flat.get(c) for c in ROW_COLUMNS] + labels)
    return list(ROW_COLUMNS) + [f"judge:{j}" for j in judges], out


def write_exports(run: Run, out_dir: Path, thresholds: Thresholds | None = None) -> list[Path]:
    """Write variants.csv (and rows.csv when rows.jsonl exists) into `out_dir`; return the paths."""
    tables = {"variants.csv": variants_table(run, thresholds)}
    if run.rows_present:
        tables["rows.csv"] = rows_table(run)
    paths = []
    for name, (header, rows) in tables.items():
        path = Path(out_dir) / name
        try:
            write_atomic(path, _csv(header, rows))
        except OSError as exc:
            raise ReportError(f"{path}: cannot be written ({_one_line(exc)}); choose a writable run directory") from None
        paths.append(path)
    return paths
