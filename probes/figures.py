"""Figures of the probe results, drawn on standalone matplotlib Agg figures (no pyplot state).

- :func:`metrics_figure`: per-layer held-out probe accuracy (each model's own probe, and the FP
  probe transferred to each variant), Fisher separability, and the transfer accuracy drop.
- :func:`maps_figure`: small multiples of 2D maps, one column per layer; the first row is the FP
  model, each further row a variant drawn (filled) over the FP points (hollow) in the FP basis.
- :func:`scores_figure`: per layer, the distribution of the FP probe's score ``w . h + b`` for each
  class, FP (outline) against each variant (filled); the dashed line at 0 is the decision boundary.

Classes always differ by colour *and* marker: benign = blue circles, harmful = vermillion
triangles (Okabe-Ito, colour-blind-safe). Variants in line plots differ by colour and marker too;
the FP reference is black.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.files import atomic_write

from .projection import Projection2D

__all__ = ["CLASS_STYLE", "metrics_figure", "maps_figure", "scores_figure", "save_figure"]

#: label -> (name, colour, marker)
CLASS_STYLE = {0: ("benign", "#0072B2", "o"), 1: ("harmful", "#D55E00", "^")}
REFERENCE_COLOUR = "#000000"
VARIANT_COLOURS = ("#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#0072B2", "#D55E00")
VARIANT_MARKERS = ("s", "D", "v", "P", "X", "h", "<")
_RC = {"svg.hashsalt": "safequant", "svg.fonttype": "path", "font.size": 9,
       "axes.spines.top": False, "axes.spines.right": False}
#: Scatter panels with more points than this are rasterised inside the SVG (keeps files small;
#: axes, labels and text stay vector).
RASTERIZE_ABOVE = 400


def _variant_style(i: int, is_reference: bool) -> tuple[str, str]:
    if is_reference:
        return REFERENCE_COLOUR, "o"
    return VARIANT_COLOURS[i % len(VARIANT_COLOURS)], VARIANT_MARKERS[i % len(VARIANT_MARKERS)]


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("svg", "png"), dpi: int = 130) -> dict[str, Path]:
    """Write ``stem.<fmt>`` for each format (svg, png); deterministic SVG (no date, fixed ids)."""
    out: dict[str, Path] = {}
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_RC):
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            meta = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
            atomic_write(path, buf.getvalue())  # a unique temp name: two writers never collide
            out[fmt] = path
    return out


# ---------------------------------------------------------------------------------------------


def metrics_figure(rows: Sequence[Mapping[str, Any]], reference: str, title: str = "") -> Figure:
    """Per-layer lines from the probe table rows (keys: variant, layer, accuracy, fisher,
    transfer_accuracy, transfer_drop); ``reference`` names the FP variant."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    with matplotlib.rc_context(_RC):
        has_variants = len(variants) > 1
        fig = _new_figure(13.0 if has_variants else 9.0, 3.9)
        axes = fig.subplots(1, 3 if has_variants else 2)
        ax_acc, ax_sep = axes[0], axes[1]
        ax_drop = axes[2] if has_variants else None
        k = 0
        sep_values = []
        for name in variants:
            rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["layer"])
            is_ref = name == reference
            colour, marker = _variant_style(k, is_ref)
            if not is_ref:
                k += 1
            layers = [r["layer"] for r in rs]
            acc = [_f(r.get("accuracy")) for r in rs]
            ax_acc.plot(layers, acc, color=colour, marker=marker, ms=5, lw=1.6 if is_ref else 1.1,
                        ls="-" if is_ref else ":", label=f"{name} (own probe)" if not is_ref else f"{name} (reference)")
            if not is_ref:
                ax_acc.plot(layers, [_f(r.get("transfer_accuracy")) for r in rs], color=colour, marker=marker,
                            ms=5, lw=1.6, ls="-", label=f"{name} ({reference} probe)")
                assert ax_drop is not None
                ax_drop.plot(layers, [_f(r.get("transfer_drop")) for r in rs], color=colour, marker=marker,
                             ms=5, lw=1.6, label=name)
            fis = [_f(r.get("fisher")) for r in rs]
            sep_values += [v for v in fis if v is not None and v > 0]
            ax_sep.plot(layers, fis, color=colour, marker=marker, ms=5, lw=1.6 if is_ref else 1.2, label=name)
        all_layers = sorted({r["layer"] for r in rows})
        for ax in axes:
            ax.set_xlabel("decoder layer")
            ax.grid(True, color="#dddddd", lw=0.6)
            if len(all_layers) <= 16:
                ax.set_xticks(all_layers)
        accs = [v for r in rows for v in (_f(r.get("accuracy")), _f(r.get("transfer_accuracy"))) if v is not None]
        ax_acc.set_ylim(min([0.4] + [v - 0.05 for v in accs]), 1.03)
        ax_acc.axhline(0.5, color="#999999", lw=0.8, ls="--")
        ax_acc.set_ylabel("held-out accuracy (harmful vs benign)")
        ax_acc.set_title("Probe accuracy per layer", loc="left", fontweight="bold")
        ax_acc.legend(fontsize=7, loc="lower right")
        null = [(r["layer"], _f(r.get("fisher_null"))) for r in rows if r["variant"] == reference]
        if null and all(v is not None for _, v in null):
            ax_sep.plot([x for x, _ in null], [v for _, v in null], color="#999999", ls="--", lw=0.9,
                        label="no-separation level (same distribution)")
            sep_values += [v for _, v in null if v > 0]
        if sep_values and max(sep_values) / max(min(sep_values), 1e-12) > 20:
            ax_sep.set_yscale("log")
        ax_sep.set_ylabel("Fisher separability J = |mu1-mu0|² / (tr S0 + tr S1)")
        ax_sep.set_title("Class separation per layer", loc="left", fontweight="bold")
        ax_sep.legend(fontsize=7)
        if ax_drop is not None:
            ax_drop.axhline(0.0, color="#999999", lw=0.8)
            ax_drop.set_ylabel(f"{reference}-probe accuracy drop on the variant ({reference} − variant)")
            ax_drop.set_title(f"Boundary moved (vs {reference})", loc="left", fontweight="bold")
            ax_drop.legend(fontsize=7)
        if title:
            fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    return fig


def _f(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _scatter(ax, P: np.ndarray, y: np.ndarray, *, hollow: bool, alpha: float, size: float) -> None:
    for label, (name, colour, marker) in CLASS_STYLE.items():
        pts = P[y == label]
        if len(pts) == 0:
            continue
        kw = ({"facecolors": "none", "edgecolors": colour, "linewidths": 0.7} if hollow
              else {"c": colour, "edgecolors": "white", "linewidths": 0.3})
        ax.scatter(pts[:, 0], pts[:, 1], marker=marker, s=size, alpha=alpha, zorder=1, **kw)
    if len(P) > RASTERIZE_ABOVE // 2:
        ax.set_rasterization_zorder(1.5)  # the points of this axes become one bitmap inside the SVG


def maps_figure(maps: Mapping[int, Projection2D], y: Any, *, reference: str = "fp",
                variants: Sequence[str] = (), title: str = "") -> Figure:
    """Small multiples: columns = layers (``maps`` keys), rows = reference then each variant
    (``variants[i]`` is ``maps[layer].others[i]``)."""
    y = np.asarray(y)
    layers = sorted(maps)
    n_rows, n_cols = 1 + len(variants), len(layers)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(2.7 * n_cols, 5.0), 2.6 * n_rows + 0.5)
        axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
        for c, layer in enumerate(layers):
            m = maps[layer]
            every = [m.points] + [o for o in m.others]
            allp = np.concatenate(every)
            lo, hi = allp.min(0), allp.max(0)
            pad = (hi - lo) * 0.06 + 1e-9
            for r in range(n_rows):
                ax = axes[r, c]
                if r == 0:
                    _scatter(ax, m.points, y, hollow=False, alpha=0.8, size=16)
                else:
                    _scatter(ax, m.points, y, hollow=True, alpha=0.35, size=14)
                    _scatter(ax, m.others[r - 1], y, hollow=False, alpha=0.85, size=16)
                ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
                ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
                ax.set_xlabel(m.axis_labels[0], fontsize=7.5)
                ax.set_ylabel(m.axis_labels[1], fontsize=7.5)
                ax.tick_params(labelsize=6.5)
                row_name = reference if r == 0 else variants[r - 1]
                ax.set_title(f"layer {layer} · {row_name}", fontsize=8.5, loc="left")
        handles = [Line2D([], [], ls="", marker=mk, color=col, markersize=6, label=name)
                   for name, col, mk in CLASS_STYLE.values()]
        if variants:
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="#555555",
                                  markersize=6, label=f"rows below the first: the variant (filled) over {reference} (hollow)"))
        method = next(iter(maps.values())).method.upper() if maps else ""
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle(title or f"{method} of activations, basis fitted on {reference}", x=0.01, ha="left",
                     fontweight="bold")
    return fig


def scores_figure(scores: Mapping[str, Mapping[int, np.ndarray]], y: Any, *, reference: str = "fp",
                  title: str = "") -> Figure:
    """Histograms of the FP probe's score per class; ``scores[variant][layer]`` are the scores of
    every prompt (the reference first). Rows: variants (the reference alone if there are none)."""
    y = np.asarray(y)
    names = list(scores)
    ref = scores[reference]
    layers = sorted(ref)
    rows = [n for n in names if n != reference] or [reference]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(2.7 * len(layers), 5.0), 2.3 * len(rows) + 0.5)
        axes = np.atleast_2d(fig.subplots(len(rows), len(layers), squeeze=False))
        for c, layer in enumerate(layers):
            vals = np.concatenate([np.asarray(scores[n][layer]) for n in names])
            vals = vals[np.isfinite(vals)]
            lo, hi = (np.percentile(vals, 0.5), np.percentile(vals, 99.5)) if len(vals) else (-1, 1)
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            bins = np.linspace(lo, hi, 31) if hi > lo else 30
            for r, name in enumerate(rows):
                ax = axes[r, c]
                for label, (cname, colour, _mk) in CLASS_STYLE.items():
                    ref_s = np.clip(np.asarray(ref[layer])[y == label], lo, hi)
                    ax.hist(ref_s, bins=bins, histtype="step", color=colour, lw=1.3,
                            label=f"{cname} · {reference}")
                    if name != reference:
                        var_s = np.clip(np.asarray(scores[name][layer])[y == label], lo, hi)
                        ax.hist(var_s, bins=bins, histtype="stepfilled", color=colour, alpha=0.35,
                                hatch="//" if label == 1 else None, label=f"{cname} · the row's variant")
                ax.axvline(0.0, color="#333333", ls="--", lw=0.9)
                ax.set_xlabel(f"{reference} probe score w·h+b (layer {layer})", fontsize=7.5)
                ax.set_ylabel("prompts", fontsize=7.5)
                ax.tick_params(labelsize=6.5)
                ax.set_title(f"layer {layer} · {name}", fontsize=8.5, loc="left")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=7.5, frameon=False)
        fig.suptitle(title or f"Where each class falls on the {reference} probe direction (all prompts; right of 0 = "
                              "read as harmful)",
                     x=0.01, ha="left", fontweight="bold")
    return fig
