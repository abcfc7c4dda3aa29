"""The "Activation probes" section of the report.

Reads ``summary["probes"]`` (the dict `probes.suite.ProbeSuite.finish` returns; schema in
docs/architecture.md, "Probe results") or, when the summary has none, ``probes/probe_summary.json``
in the run directory; figures are files the suite wrote inside the run directory, inlined as
data: URIs. Reads JSON and image files only: never imports torch, transformers, `harness` or
`probes`. Returns None (section left out) when the run has no probe results.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from . import figures

log = logging.getLogger(__name__)

#: Inline an SVG figure only up to this size; larger ones fall back to the PNG.
MAX_SVG_BYTES = 1_500_000
MAX_IMAGE_BYTES = 6_000_000
FIGURES = (
    ("metrics", "Per decoder layer: held-out accuracy of each model's own probe (dotted) and of the FP probe "
                "applied unchanged to each variant (solid); Fisher separability J = ‖μ₁−μ₀‖² / (tr S₀ + tr S₁) "
                "with the no-separation level dashed; and the FP probe's accuracy drop on each variant."),
    ("maps", "2D maps at selected layers, basis fitted on the FP activations. Benign prompts are blue circles, "
             "harmful ones vermillion triangles; in the variant rows the variant's points (filled) are drawn over "
             "the FP points (hollow), so any shift is a shift in FP coordinates."),
    ("scores", "Where each class falls on the FP probe direction (score w·h+b; right of the dashed 0 line is read "
               "as harmful): FP as outlines, the variant filled. A harmful histogram sliding left means the "
               "variant's harmful prompts look more benign to the FP model's probe."),
)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v * 100:.1f}%"


def _pts(x: Any) -> str:
    v = _num(x)
    if v is None:
        return ""
    p = v * 100
    return "±0.0 pts" if abs(p) < 0.05 else f"{'+' if p > 0 else '−'}{abs(p):.1f} pts"


def _g(x: Any, digits: int = 3) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if v != 0 and (abs(v) >= 1000 or abs(v) < 10 ** -(digits - 1)):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _load(run) -> dict[str, Any] | None:
    data = run.summary.get("probes")
    if isinstance(data, dict) and data.get("variants"):
        return data
    path = Path(run.run_dir) / "probes" / "probe_summary.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable (%s); no probe section", path, exc)
            return None
        if isinstance(data, dict) and data.get("variants"):
            return data
    return None


def _image(base: Path, rel: Any, run_dir: Path) -> str | None:
    """A data: URI for figure ``base/rel`` inside the run directory, or None if missing/outside/too big."""
    if not isinstance(rel, str) or not rel:
        return None
    root = run_dir.resolve()
    path = (base.resolve() / rel).resolve()
    if root not in path.parents or not path.is_file():
        return None
    size = path.stat().st_size
    if path.suffix == ".svg" and size <= MAX_SVG_BYTES:
        text = path.read_text(encoding="utf-8", errors="replace")
        return figures.svg_data_uri(text[text.find("<svg"):] if "<svg" in text else text)
    if path.suffix == ".png" and size <= MAX_IMAGE_BYTES:
        return figures.png_data_uri(path.read_bytes())
    return None


def _drop_class(drop: float | None, c) -> str:
    if drop is None or drop < c.opts.change_epsilon:
        return "same"
    return "worse strong" if drop >= c.opts.refusal_drop_alarm else "worse"


def _mean_range(stats: Any) -> str:
    """``mean [q10, q90]`` of a probe-logit distribution (probes.realign.logit_stats)."""
    if not isinstance(stats, dict):
        return "—"
    return f"{_g(stats.get('mean'), 2)} [{_g(stats.get('q10'), 2)}, {_g(stats.get('q90'), 2)}]"


def _lens(row: Any, kind: str) -> str:
    lens = row.get("lens") if isinstance(row, dict) else None
    return _pct(lens.get(kind)) if isinstance(lens, dict) else "—"


def build_realign(run) -> list[dict[str, Any]]:
    """Q-realign's per-layer diagnostics (``metadata["diagnostics"]`` of each qrealign variant,
    written by ``quantizers.qrealign`` with ``probes.realign``): the aligned probes' logit
    distribution and the logit-lens refusal probability per layer, for the aligned parent, the FP
    subject and the quantized variant, and where the subject's refusal decision departs from the
    aligned one."""
    out = []
    for v in run.summary.get("variants") or []:
        meta = ((v.get("quantizer") or {}).get("metadata") or {}) if isinstance(v, dict) else {}
        diag = meta.get("diagnostics") if isinstance(meta, dict) else None
        models = diag.get("models") if isinstance(diag, dict) else None
        if not isinstance(models, dict) or not isinstance(models.get("fp"), dict):
            continue
        names = [k for k in ("aligned", "fp", "quantized") if isinstance(models.get(k), dict)]
        by_layer: dict[int, dict[str, Any]] = {}
        for k in names:
            for r in models[k].get("layers") or []:
                if isinstance(r, dict) and isinstance(r.get("layer"), int):
                    by_layer.setdefault(r["layer"], {})[k] = r
        rows = [{"layer": layer,
                 "cells": [{"harmful": _mean_range(((cells.get(k) or {}).get("probe") or {}).get("harmful")),
                            "benign": _mean_range(((cells.get(k) or {}).get("probe") or {}).get("benign")),
                            "lens_harmful": _lens(cells.get(k), "harmful"), "lens_benign": _lens(cells.get(k), "benign")}
                           for k in names]}
                for layer, cells in sorted(by_layer.items())]
        sentences = []
        div = diag.get("divergence") if isinstance(diag.get("divergence"), dict) else {}
        fp_pos = [x for x in ((div.get("fp") or {}).get("probe_positive") or {}).values() if _num(x) is not None]
        if fp_pos:
            sentences.append(f"The aligned probes read {_pct(min(fp_pos))} to {_pct(max(fp_pos))} of the FP subject's "
                             "held-out harmful prompts as harmful (per layer): where this is high, the probe loss is "
                             "already small and has little gradient left.")
        for key, label in (("fp", "the FP subject"), ("quantized", str(v.get("name")))):
            d = div.get(key) if isinstance(div.get(key), dict) else None
            if d is None or _num(d.get("final_gap")) is None:
                continue
            where = (f"from layer {d['layer']} on" if isinstance(d.get("layer"), int)
                     else "at no layer by 5 points or more")
            sentences.append(f"Logit lens: {label}'s refusal first-token probability on harmful prompts departs from "
                             f"the aligned model's {where} (gap at the last layer {_pts(d.get('final_gap'))}).")
        out.append({"variant": str(v.get("name")), "models": names, "rows": rows, "sentences": sentences,
                    "n": len(diag.get("prompt_ids") or [])})
    return out


def build_probes(c) -> dict[str, Any] | None:
    """Template data of the probe section (see reports/templates/report.html.j2, section_probes)."""
    data = _load(c.run)
    realign = build_realign(c.run)
    if data is None:
        return {"realign": realign, "rows": [], "sentences": [], "figures": []} if realign else None
    variants = [v for v in data.get("variants") or [] if isinstance(v, dict) and isinstance(v.get("layers"), list)]
    if not variants:
        return None
    ref = next((v for v in variants if v.get("is_reference")), variants[0])
    others = [v for v in variants if v is not ref]
    n = data.get("n") or {}
    position = "the last prompt token" if data.get("position") == "last" else "the mean over prompt tokens"

    sentences = []
    best_acc = _num(ref.get("best_accuracy"))
    sentences.append(
        f"On {ref.get('name')}, harmful and benign prompts are told apart best at layer {ref.get('best_layer')} "
        f"(held-out accuracy {_pct(best_acc)}, AUROC {_g(ref.get('best_auroc'))}); class separation (Fisher J) "
        f"peaks at layer {ref.get('max_fisher_layer')} (J = {_g(ref.get('max_fisher'))})."
    )
    for v in others:
        drop = _num(v.get("max_transfer_drop"))
        mean_drop = _num(v.get("mean_transfer_drop"))
        if drop is not None and drop >= c.opts.change_epsilon:
            sentences.append(
                f"{v.get('name')}: the {ref.get('name')} probe loses up to {_pts(drop).replace('+', '')} of accuracy "
                f"(worst at layer {v.get('worst_transfer_layer')}, mean {_pts(mean_drop)} over layers); "
                f"its own probe still reaches {_pct(v.get('best_accuracy'))} at layer {v.get('best_layer')}."
            )
        else:
            sentences.append(f"{v.get('name')}: the {ref.get('name')} probe reads it as well as {ref.get('name')} at every layer "
                             f"(largest drop {_pts(drop) or '—'}); the boundary did not move measurably.")

    by_layer: dict[int, dict[str, dict[str, Any]]] = {}
    for v in variants:
        for r in v["layers"]:
            if isinstance(r, dict) and isinstance(r.get("layer"), int):
                by_layer.setdefault(r["layer"], {})[str(v.get("name"))] = r
    rows = []
    for layer in sorted(by_layer):
        cells = by_layer[layer]
        r0 = cells.get(str(ref.get("name")), {})
        row = {"layer": layer, "best": layer == ref.get("best_layer"),
               "ref": {"acc": _pct(r0.get("accuracy")), "auroc": _g(r0.get("auroc")), "fisher": _g(r0.get("fisher")),
                       "nonzero": r0.get("nonzero", "—")},
               "variants": []}
        for v in others:
            r = cells.get(str(v.get("name")), {})
            drop = _num(r.get("transfer_drop"))
            row["variants"].append({"transfer": _pct(r.get("transfer_accuracy")),
                                    "delta": _pts(-drop) if drop is not None else "",
                                    "cls": _drop_class(drop, c), "own": _pct(r.get("accuracy")),
                                    "fisher": _g(r.get("fisher")), "drift": _pct(r.get("relative_drift")),
                                    "cosine": _g(r.get("direction_cosine"))})
        rows.append(row)

    run_dir = Path(c.run.run_dir)
    figs = []
    fig_files = ((data.get("files") or {}).get("figures") or {})
    for key, caption in FIGURES:
        entry = fig_files.get(key) or {}
        # paths are relative to the run directory (audit) or to the probe folder itself (CLI output
        # copied in as RUN_DIR/probes/)
        # (the smaller of the SVG and the PNG: dense scatter plots are smaller as PNG)
        found = [u for base in (run_dir, run_dir / "probes") for fmt in ("svg", "png")
                 if (u := _image(base, entry.get(fmt), run_dir))]
        src = min(found, key=len) if found else None
        if src:
            figs.append({"src": src, "caption": caption, "alt": f"probe figure: {key}"})
    settings = data.get("settings") or {}
    return {
        "realign": realign,
        "sentences": sentences,
        "reference": str(ref.get("name")),
        "variants": [str(v.get("name")) for v in others],
        "position": position,
        "n_harmful": n.get("harmful", "—"), "n_benign": n.get("benign", "—"),
        "n_train": n.get("train", "—"), "n_test": n.get("test", "—"),
        "rows": rows,
        "figures": figs,
        "settings": [(k, "none" if v is None else str(v)) for k, v in settings.items()],
        "timing": [(str(v.get("name")), f"capture {_g(v.get('capture_seconds'))} s, fit {_g(v.get('fit_seconds'))} s")
                   for v in variants],
        "last_layer_normed": any(v.get("last_layer") == "hidden_states" for v in variants),
    }
