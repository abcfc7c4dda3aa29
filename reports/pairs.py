"""Head-to-head tables: one variant against another on the same prompts.

The decisive test of a safety-aware method is not each variant against FP but the method against
its safety-blind counterpart at the same scheme (AAQ against OST, AAQ.md), so the audit writes
paired statistics for chosen pairs (`summary["statistics"]["pairs"]`, harness.stats.pairwise_block)
and `safequant compare` computes the same for variants of two runs. This module turns either into
table rows, once, for the report's section, the comparison page and the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .fmt import fmt_pct, fmt_pts, fmt_ratio
from .run import ROLE_DIRECTION, _num, perplexity_ratio, prompt_sets
from .verdicts import fmt_p

#: Keys of the pooled blocks, after the per-set ones.
POOLED = {"harmful": "all harmful", "benign": "all benign"}


def flat_pair_stats(block: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"sets": {...}, "overall": {...}}`` (harness.stats.paired_by_set) as one ``{row name:
    paired_compare}`` mapping: every set, then the pools by prompt label."""
    out = {str(k): v for k, v in (block.get("sets") or {}).items() if isinstance(v, Mapping)}
    for label, name in POOLED.items():
        st = (block.get("overall") or {}).get(label)
        if isinstance(st, Mapping):
            out[name] = st
    return out


def pair_rows(stats: Mapping[str, Mapping[str, Any]], roles: Mapping[str, str], change_class) -> list[dict[str, Any]]:
    """One row per set (or pool): both refusal rates, the difference (candidate - reference) with
    its bootstrap interval, flips both ways and McNemar's p. ``change_class(delta, direction)``
    colours the difference by the set's role."""
    rows = []
    for key, st in stats.items():
        ref = _num(((st.get("reference") or {}).get("refusal") or {}).get("rate"))
        var = _num(((st.get("variant") or {}).get("refusal") or {}).get("rate"))
        diff = _num(st.get("refusal_diff"))
        ci = st.get("refusal_diff_ci95") or []
        role = roles.get(key, key.split()[-1] if key.startswith("all ") else "other")
        flips = st.get("flips") or {}
        rows.append({"set": key, "role": role, "n": st.get("n_pairs", 0), "ref": fmt_pct(ref), "var": fmt_pct(var),
                     "diff": fmt_pts(diff), "ci": f"[{fmt_pts(ci[0])}, {fmt_pts(ci[1])}]" if len(ci) == 2 else "—",
                     "cls": change_class(diff, ROLE_DIRECTION.get(role, 0)),
                     "lost": flips.get("refusal_lost", 0), "gained": flips.get("refusal_gained", 0),
                     "p": fmt_p(_num(st.get("mcnemar_p"))), "unmatched": st.get("n_unmatched", 0)})
    return rows


def format_pair_rows(rows: list[dict[str, Any]], candidate: str, reference: str) -> str:
    """The rows of :func:`pair_rows` as a plain-text table for the terminal."""
    header = ["set", "pairs", reference, candidate, "difference", "95% CI", "lost", "gained", "McNemar"]
    lines = [header] + [[r["set"], str(r["n"]), r["ref"], r["var"], r["diff"] or "—", r["ci"], str(r["lost"]),
                         str(r["gained"]), r["p"]] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def build_pairs(c) -> dict[str, Any] | None:
    """The report's head-to-head section, from ``summary["statistics"]["pairs"]``; None without pairs."""
    from .render import _change_class

    blocks = [b for b in ((c.run.summary.get("statistics") or {}).get("pairs") or []) if isinstance(b, Mapping)]
    if not blocks:
        return None
    roles = {s.name: s.role for s in prompt_sets(c.run)}
    by_name = {str(v.get("name")): v for v in c.run.variants}
    tables = []
    for b in blocks:
        cand, ref = str(b.get("a")), str(b.get("b"))
        rows = pair_rows(flat_pair_stats(b), roles, lambda d, direction: _change_class(d, direction, c.opts))
        tables.append({"candidate": cand, "reference": ref, "origin": str(b.get("origin") or "user"), "rows": rows,
                       "ppl_candidate": fmt_ratio(perplexity_ratio(by_name.get(cand) or {}, c.run.reference)),
                       "ppl_reference": fmt_ratio(perplexity_ratio(by_name.get(ref) or {}, c.run.reference))})
    return {"tables": tables, "judge": str(blocks[0].get("judge") or c.judge or "primary"),
            "alpha": f"{c.opts.thresholds.significance:g}"}
