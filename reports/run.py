"""A loaded run directory and the per-variant numbers every consumer reads the same way.

The report, the comparison page and the gate all read rates and perplexity ratios through these
functions, so a number cannot differ between the report's table and the gate's decision. Plain
JSON only: never imports torch, transformers or `harness` (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import JsonlLineError, jsonl_objects

from .atomic import atomic_write
from .errors import ReportError
from .schema import migrate
from .summary_model import Row, Summary
from .validation import check_schema

log = logging.getLogger(__name__)

#: Known prompt-set roles in display order, and whether refusing is the right answer.
ROLE_ORDER = ("harmful", "benign", "overrefusal")
ROLE_TITLES = {
    "harmful": "Refusal on harmful prompts",
    "benign": "Refusal on benign prompts",
    "overrefusal": "Over-refusal",
}
ROLE_HINTS = {
    "harmful": "higher is safer",
    "benign": "lower is better",
    "overrefusal": "lower is better",
}
#: +1: more refusal is better, -1: less refusal is better, 0: unknown role, not coloured.
ROLE_DIRECTION = {"harmful": 1, "benign": -1, "overrefusal": -1}



@dataclass
class Run:
    """A loaded run directory."""

    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    rows_present: bool = True

    @property
    def variants(self) -> list[dict[str, Any]]:
        return self.summary["variants"]

    @property
    def reference(self) -> dict[str, Any] | None:
        return self.variants[0] if self.variants else None


# --------------------------------------------------------------------------------------------
# loading


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_run(run_dir: Path) -> Run:
    """Read and check summary.json and rows.jsonl; raise ReportError for anything unusable."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; pass the run directory that holds summary.json")
    if not summary_path.is_file():
        raise ReportError(
            f"{summary_path}: not found; pass a finished run directory (the audit writes "
            "summary.json after its first variant) or re-run the audit"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(
            f"{summary_path}: cannot be read as JSON ({_one_line(exc)}); re-run the audit to rewrite it"
        ) from None
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path}: expected a JSON object at the top level; re-run the audit")
    summary = migrate(summary, str(summary_path))
    check_schema(Summary, summary, str(summary_path), "re-run the audit to rewrite it", ReportError)
    for key in ("prompt_sets", "config", "models", "environment", "perplexity"):
        if summary.get(key) is None:
            summary[key] = {}

    rows_path = run_dir / "rows.jsonl"
    rows: list[dict[str, Any]] = []
    rows_present = rows_path.is_file()
    if rows_present:
        try:
            with rows_path.open(encoding="utf-8") as fh:
                for lineno, row in jsonl_objects(fh):
                    check_schema(Row, row, f"{rows_path}: line {lineno}", "re-run the audit to rewrite it",
                                 ReportError)
                    rows.append(row)
        except JsonlLineError as exc:
            raise ReportError(f"{rows_path}: {exc}; re-run the audit to rewrite it") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"{rows_path}: cannot be read ({_one_line(exc)}); re-run the audit") from None
    else:
        log.warning("%s: not found; the report will have no sample responses", rows_path)
    return Run(run_dir=run_dir, summary=summary, rows=rows, rows_present=rows_present)



#: Readers (a browser, CI) see the old file or the new one, never half of it.
write_atomic = atomic_write

#: What a run directory holds besides work/ and probes/: written only by the audit and its commands.
RUN_FILES = ("summary.json", "rows.jsonl", "variants.csv", "rows.csv", "report.html", "compare.html", "junit.xml")


def check_output_path(out: Path, own: str, option: str) -> None:
    """Refuse an output path that would overwrite a run directory's own files (``report --output
    RUN/summary.json`` once replaced the summary with HTML): only ``own`` (e.g. ``report.html``),
    or a name that is not a run file, may be written directly inside a run directory."""
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"{option} {out} is a folder: give a file path, e.g. {out / own}")
    resolved = out.resolve()
    for depth, parent in enumerate(resolved.parents):
        if depth > 4:
            break
        if (parent / "summary.json").is_file():
            rel = resolved.relative_to(parent)
            if len(rel.parts) > 1 or rel.name.startswith(".") or (rel.name in RUN_FILES and rel.name != own):
                raise ReportError(f"{option} {out} would overwrite {rel} of run directory {parent}: write the file "
                                  f"elsewhere, or use the default ({parent / own})")
            return


def _num(x: Any, *, allow_inf: bool = False) -> float | None:
    """A float, or None for missing / non-numeric / NaN values (and infinities unless allowed).

    Perplexity may legitimately be +inf (a variant whose loss overflowed); it is shown as ∞.
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        return None
    return x



# --------------------------------------------------------------------------------------------
# per-variant metrics


@dataclass(frozen=True)
class SetInfo:
    name: str
    role: str
    n: int | None
    source: str | None


def prompt_sets(run: Run) -> list[SetInfo]:
    """Prompt sets in display order: by role (harmful, benign, overrefusal, others), then as listed.

    Sets that only appear in variant metrics (not in summary["prompt_sets"]) are included with
    role "harmful"/"benign"/"overrefusal" when their name is a role, else "other".
    """
    declared = run.summary.get("prompt_sets", {})
    sets: dict[str, SetInfo] = {}
    for name, info in declared.items():
        info = info if isinstance(info, dict) else {}
        role = str(info.get("role") or (name if name in ROLE_ORDER else "other"))
        n = info.get("n")
        sets[name] = SetInfo(name, role, n if isinstance(n, int) else None, info.get("source"))
    for v in run.variants:
        for name in (v.get("metrics") or {}).get("refusal") or {}:
            if name not in sets:
                sets[name] = SetInfo(name, name if name in ROLE_ORDER else "other", None, None)
    order = list(sets)

    def key(s: SetInfo) -> tuple[int, str, int]:
        r = ROLE_ORDER.index(s.role) if s.role in ROLE_ORDER else len(ROLE_ORDER)
        return (r, "" if s.role in ROLE_ORDER else s.role, order.index(s.name))

    return sorted(sets.values(), key=key)


def set_rate(variant: dict[str, Any], set_name: str) -> float | None:
    """Refusal rate of a variant on one set: metrics.refusal[set], else from counts."""
    rate = _num(((variant.get("metrics") or {}).get("refusal") or {}).get(set_name))
    if rate is not None:
        return rate
    c = (variant.get("counts") or {}).get(set_name) or {}
    n, r = _num(c.get("n")), _num(c.get("refusal"))
    return r / n if n and r is not None else None


def set_counts(variant: dict[str, Any], set_name: str) -> dict[str, int] | None:
    c = (variant.get("counts") or {}).get(set_name)
    if not isinstance(c, dict) or not isinstance(c.get("n"), int):
        return None
    return {k: int(c.get(k) or 0) for k in ("n", "refusal", "compliance", "empty")}


def role_rate(variant: dict[str, Any], sets: Iterable[SetInfo], role: str) -> float | None:
    """Refusal rate over every set of a role: pooled by counts when all have them, else the mean."""
    names = [s.name for s in sets if s.role == role]
    rates = [(n, set_rate(variant, n), set_counts(variant, n)) for n in names]
    rates = [(n, r, c) for n, r, c in rates if r is not None]
    if not rates:
        return None
    if all(c and c["n"] for _, _, c in rates):
        return sum(c["refusal"] for _, _, c in rates) / sum(c["n"] for _, _, c in rates)
    return sum(r for _, r, _ in rates) / len(rates)


def perplexity(variant: dict[str, Any]) -> float | None:
    return _num((variant.get("metrics") or {}).get("perplexity"), allow_inf=True)


def perplexity_ratio(variant: dict[str, Any], reference: dict[str, Any] | None) -> float | None:
    ratio = _num((variant.get("metrics") or {}).get("perplexity_ratio"), allow_inf=True)
    if ratio is not None:
        return ratio
    if variant is reference:
        return 1.0 if perplexity(variant) is not None else None
    p, p0 = perplexity(variant), perplexity(reference) if reference else None
    if p is None or not p0 or math.isinf(p0):
        return None
    return p / p0




# --------------------------------------------------------------------------------------------
# paired statistics written by the audit (summary["statistics"], harness.stats.summary_block)


def primary_judge(run: Run) -> str | None:
    """The judge whose labels are the rates: flagged primary in summary["judges"], else the first."""
    judges = [j for j in run.summary.get("judges") or [] if isinstance(j, dict) and j.get("name")]
    for j in judges:
        if j.get("primary"):
            return str(j["name"])
    if judges:
        return str(judges[0]["name"])
    stats_judges = (run.summary.get("statistics") or {}).get("judges") or []
    if stats_judges:
        return str(stats_judges[0])
    return next((str(r["judge"]) for r in run.rows if r.get("judge")), None)


def comparison(run: Run, variant: str, sets: Iterable[SetInfo], role: str) -> dict[str, Any] | None:
    """The audit's paired comparison (variant vs reference, primary judge) for every set of a role.

    One set of the role: that set's block; several harmful sets: the pooled "overall.harmful"
    block; otherwise None (no single paired test covers them).
    """
    judge = primary_judge(run)
    block = ((((run.summary.get("statistics") or {}).get("comparisons") or {}).get(variant) or {})
             .get(judge or "") or {})
    names = [s.name for s in sets if s.role == role]
    if len(names) == 1:
        found = (block.get("sets") or {}).get(names[0])
        return found if isinstance(found, dict) else None
    if names and role == "harmful":
        found = (block.get("overall") or {}).get("harmful")
        return found if isinstance(found, dict) else None
    return None


def incoherent_rate(variant: dict[str, Any], set_name: str) -> float | None:
    """Share of a variant's responses on a set that the FP model finds incoherent (schema 2)."""
    return _num(((variant.get("metrics") or {}).get("incoherent") or {}).get(set_name))


def corrected_rate(run: Run, variant: str, set_name: str) -> dict[str, Any] | None:
    """The primary judge's Rogan-Gladen corrected refusal rate of a variant on a set (schema 2:
    ``statistics.corrected``), or None when the judge has no measured error profile."""
    block = (((run.summary.get("statistics") or {}).get("corrected") or {}).get(variant) or {})
    found = (block.get(primary_judge(run) or "") or {}).get(set_name)
    return found if isinstance(found, dict) and _num(found.get("corrected")) is not None else None


def role_interval(run: Run, variant: dict[str, Any], sets: list[SetInfo], role: str) -> list[float] | None:
    """Wilson 95% interval of a variant's refusal rate on a role, as the audit computed it."""
    names = [s.name for s in sets if s.role == role]
    judge = primary_judge(run)
    stats = run.summary.get("statistics") or {}
    if len(names) == 1:
        block = ((((stats.get("rates") or {}).get(str(variant["name"])) or {}).get(judge or "") or {})
                 .get(names[0]) or {})
        ci = (block.get("refusal") or {}).get("ci95")
    else:
        ref = run.reference
        side = "reference" if variant is ref else "variant"
        cmp_name = str(variant["name"]) if variant is not ref else next(
            (str(v["name"]) for v in run.variants[1:]), "")
        block = comparison(run, cmp_name, sets, role) or {}
        ci = ((block.get(side) or {}).get("refusal") or {}).get("ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(_num(x) is not None for x in ci):
        return [float(ci[0]), float(ci[1])]
    return None
