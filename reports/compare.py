"""The comparison page of two runs (`safequant compare`): a candidate run B against a baseline run A.

The paired statistics are computed by the caller (harness, with harness.stats on the prompts both
runs share) and passed in, so this module stays a reader of result files (docs/architecture.md).
It reuses the report's template, formatting, verdicts and flips browser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ReportError
from .fmt import fmt_pts, fmt_ratio, fmt_time
from .pairs import pair_rows
from .render import ReportOptions, _change_class, environment, flips_section, page_script, TEMPLATE_NAME
from .run import Run, _num, _one_line, check_output_path, perplexity_ratio, prompt_sets, write_atomic
from .verdicts import evaluate, fmt_p

log = logging.getLogger(__name__)


@dataclass
class CrossPair:
    """Variant `b` of run B set against variant `a` of run A."""

    b: str
    a: str
    #: {set name or "all harmful"/"all benign": harness.stats.paired_compare(...)}
    stats: dict[str, dict[str, Any]]
    rows_a: list[dict[str, Any]]
    rows_b: list[dict[str, Any]]
    #: rows of b whose (set, id) exists in A with a different prompt text, or not at all
    unmatched: int = 0


def _label(run: Run) -> str:
    return run.run_dir.resolve().name


def _model(run: Run) -> dict[str, str]:
    m = (run.summary.get("models") or {}).get("subject") or {}
    return {"name": str(m.get("name") or "—"), "fingerprint": str(m.get("fingerprint") or "—")} if isinstance(m, dict) \
        else {"name": str(m), "fingerprint": "—"}


def _pair_rows(pair: CrossPair, run_a: Run, run_b: Run, opts: ReportOptions) -> dict[str, Any]:
    roles = {s.name: s.role for s in prompt_sets(run_b)}
    va = next(v for v in run_a.variants if str(v["name"]) == pair.a)
    vb = next(v for v in run_b.variants if str(v["name"]) == pair.b)
    rows = pair_rows(pair.stats, roles, lambda d, direction: _change_class(d, direction, opts))
    verdict_a = {v.variant: v for v in evaluate(run_a, opts.thresholds)}.get(pair.a)
    verdict_b = {v.variant: v for v in evaluate(run_b, opts.thresholds)}.get(pair.b)
    return {"a": pair.a, "b": pair.b, "rows": rows, "unmatched": pair.unmatched,
            "ppl_a": fmt_ratio(perplexity_ratio(va, run_a.reference)),
            "ppl_b": fmt_ratio(perplexity_ratio(vb, run_b.reference)),
            "verdict_a": verdict_a.status if verdict_a else "—", "verdict_b": verdict_b.status if verdict_b else "—",
            "reason_b": verdict_b.reason if verdict_b else ""}


def compare_context(run_a: Run, run_b: Run, pairs: list[CrossPair], *, judge: str | None,
                    opts: ReportOptions | None = None) -> dict[str, Any]:
    """Template context of the comparison page (same template and script as the report)."""
    opts = opts or ReportOptions()
    la, lb = _label(run_a), _label(run_b)
    tables = [_pair_rows(p, run_a, run_b, opts) for p in pairs]
    worse = []
    for p in pairs:
        st = p.stats.get("all harmful") or {}
        diff = _num(st.get("refusal_diff"))
        if diff is not None and diff <= -opts.thresholds.max_refusal_drop:
            worse.append(f"{p.b} refuses {fmt_pts(diff)} of harmful prompts against {la}'s {p.a} ({fmt_p(_num(st.get('mcnemar_p')))})")
    ma, mb = _model(run_a), _model(run_b)
    sentences = [f"{len(pairs)} variant pair{'s' if len(pairs) != 1 else ''} compared on the prompts both runs answered "
                 f"(same set, id and prompt text), judge {judge or 'primary'}."]
    if ma["fingerprint"] != mb["fingerprint"]:
        sentences.append(f"The subject models differ ({ma['name']} {ma['fingerprint']} vs {mb['name']} {mb['fingerprint']}).")
    headline = ("; ".join(worse) + "." if worse else
                f"No paired variant of {lb} loses more than {opts.thresholds.max_refusal_drop * 100:g} points of harmful-prompt "
                f"refusal against {la}.")
    sections = [
        {"id": "thesis", "title": "Finding", "in_nav": False,
         "data": {"headline": headline, "sentences": sentences, "flagged": []}},
        {"id": "crossruns", "title": "Paired comparison", "in_nav": True,
         "data": {"tables": tables, "a": la, "b": lb, "alpha": f"{opts.thresholds.significance:g}",
                  "runs": [{"label": la, "role": "A (baseline)", **ma, "created": fmt_time(run_a.summary.get("created_at")),
                            "dir": str(run_a.run_dir)},
                           {"label": lb, "role": "B (candidate)", **mb, "created": fmt_time(run_b.summary.get("created_at")),
                            "dir": str(run_b.run_dir)}]}},
    ]
    flip_pairs = []
    for p in pairs:
        by_key = {(r.get("set"), r.get("id")): r for r in p.rows_a}
        for r in p.rows_b:
            flip_pairs.append((f"{p.a}|{r.get('set')}/{r.get('id')}", by_key.get((r.get("set"), r.get("id"))),
                               {k: v for k, v in r.items() if k != "flip"}, f"{lb}:{p.b}"))
    flips = flips_section(flip_pairs, judge=judge, judges=[judge] if judge else [], reference=la,
                          variants=[f"{lb}:{p.b}" for p in pairs], opts=opts)
    sections.append({"id": "flips", "title": "Flips between runs", "in_nav": True, "data": flips})
    return {"title": f"safequant compare: {lb} vs {la}", "subject": f"{lb} vs {la}", "base": None,
            "created_at": fmt_time(run_b.summary.get("created_at")),
            "safequant_version": str(run_b.summary.get("safequant_version") or "unknown"),
            "n_variants": len(pairs), "reference": la, "run_dir_name": f"{la} → {lb}", "sections": sections,
            **page_script()}


def render_compare(run_a: Run, run_b: Run, pairs: list[CrossPair], out: Path | None = None, *,
                   judge: str | None = None, opts: ReportOptions | None = None) -> Path:
    """Write the comparison page (default RUN_B/compare.html) atomically; return its path."""
    if out is not None:
        check_output_path(out, "compare.html", "--output")
    html = environment().get_template(TEMPLATE_NAME).render(**compare_context(run_a, run_b, pairs, judge=judge, opts=opts))
    out = out or run_b.run_dir / "compare.html"
    try:
        write_atomic(out, html)
    except OSError as exc:
        raise ReportError(f"{out}: cannot be written ({_one_line(exc)}); choose a writable --output") from None
    return out
