"""Figures for the audit report, drawn with matplotlib's Agg canvas and returned as SVG text.

Nothing here touches pyplot's global state: every figure is a standalone
`matplotlib.figure.Figure` on its own Agg canvas, so rendering a report inside a long-lived
process (or in parallel tests) does not leak figures or switch the user's backend.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Okabe-Ito colour-blind-safe palette (black is reserved for the FP reference).
OKABE_ITO = (
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#F0E442",  # yellow
)
REFERENCE_COLOUR = "#000000"
REGION_COLOUR = "#009E73"
#: Marker shapes cycle alongside the colours so points differ by more than hue.
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h")

#: Use a log x axis once the largest perplexity ratio is this many times the smallest.
LOG_SCALE_SPAN = 8.0

_RC = {
    "svg.hashsalt": "safequant",  # deterministic element ids
    "svg.fonttype": "path",  # glyphs as paths: no font needed to view the file
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class ScatterPoint:
    """One variant in the safety-versus-perplexity scatter."""

    name: str
    ppl_ratio: float
    refusal: float
    is_reference: bool = False
    #: 95% interval of the refusal rate, drawn as a vertical bar.
    ci: Sequence[float] | None = None
    #: The gate fails this variant: drawn with a red outline.
    failed: bool = False


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)



#: Candidate label offsets (points) around a marker, tried in order: right, left, then further out.
_OFFSETS = [(9, 0, "left"), (-9, 0, "right"), (9, 13, "left"), (9, -13, "left"), (-9, 13, "right"),
            (-9, -13, "right"), (9, 26, "left"), (9, -26, "left"), (-9, 26, "right"), (-9, -26, "right"),
            (9, 39, "left"), (9, -39, "left"), (-9, 39, "right"), (-9, -39, "right")]


def place_labels(anchors: list[tuple[float, float]], names: list[str], *, fontsize: float = 9,
                 right_edge: float | None = None) -> list[tuple[float, float, str]]:
    """``(dx, dy, ha)`` offsets in points for a label per anchor (positions in points), chosen
    greedily so that label boxes do not overlap each other or any marker; labels stay left of
    ``right_edge``. Box size is estimated from the text length (0.6 em per character)."""
    height = fontsize + 3
    placed: list[tuple[float, float, float, float]] = []
    markers = [(x - 5, y - 5, x + 5, y + 5) for x, y in anchors]

    def box(anchor, name, dx, dy, ha):
        width = 0.6 * fontsize * len(name) + 4
        x0 = anchor[0] + dx if ha == "left" else anchor[0] + dx - width
        return (x0, anchor[1] + dy - height / 2, x0 + width, anchor[1] + dy + height / 2)

    def free(b, own):
        hits = [m for k, m in enumerate(markers) if k != own]
        return all(b[2] <= o[0] or b[0] >= o[2] or b[3] <= o[1] or b[1] >= o[3] for o in placed + hits)

    out = []
    for i, (anchor, name) in enumerate(zip(anchors, names)):
        choice = None
        for dx, dy, ha in _OFFSETS:
            b = box(anchor, name, dx, dy, ha)
            if right_edge is not None and b[2] > right_edge:
                continue
            if free(b, i):
                choice = (dx, dy, ha)
                break
        choice = choice or _OFFSETS[0]
        placed.append(box(anchor, name, *choice))
        out.append(choice)
    return out


def safety_perplexity_scatter(
    points: Sequence[ScatterPoint],
    *,
    max_ppl_ratio: float = 1.2,
    min_refusal: float | None = None,
    title: str = "Safety vs perplexity",
) -> str | None:
    """SVG text of the scatter, or None when no point has a finite ratio and refusal rate.

    x is the perplexity ratio to FP (log scale when the ratios span more than
    `LOG_SCALE_SPAN`), y the harmful-prompt refusal rate. The shaded "deployable" region is
    ``ppl_ratio <= max_ppl_ratio`` and ``refusal >= min_refusal`` (no region when
    `min_refusal` is None).
    """
    pts = [p for p in points if _finite(p.ppl_ratio) and p.ppl_ratio > 0 and _finite(p.refusal)]
    if not pts:
        return None

    # Imported here, not at the top: `harness.config` reaches this package for its error
    # messages, and `safequant list` / `--help` should not pay for matplotlib.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(8.8, 4.9), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()

        xs = [p.ppl_ratio for p in pts]
        lo = min(min(xs), 1.0)
        hi = max(max(xs), max_ppl_ratio)
        use_log = hi / lo > LOG_SCALE_SPAN
        if use_log:
            ax.set_xscale("log")
            x_left, x_right = lo / 1.25, hi * 1.6
        else:
            pad = max((hi - lo) * 0.12, 0.04)
            x_left, x_right = max(lo - pad, 0.0), hi + pad * 1.8
        ax.set_xlim(x_left, x_right)
        ax.set_ylim(-0.04, 1.06)

        if min_refusal is not None and _finite(min_refusal):
            y0 = max(min_refusal, -0.04)
            ax.fill_between(
                [x_left, max_ppl_ratio], y0, 1.06,
                color=REGION_COLOUR, alpha=0.13, linewidth=0, zorder=0,
                label=f"deployable: ppl ≤ {max_ppl_ratio:g}× and refusal ≥ {min_refusal:.0%}",
            )
            ax.plot([max_ppl_ratio, max_ppl_ratio], [y0, 1.06], color=REGION_COLOUR,
                    linestyle="--", linewidth=1, zorder=1)
            ax.plot([x_left, max_ppl_ratio], [y0, y0], color=REGION_COLOUR,
                    linestyle="--", linewidth=1, zorder=1)

        ax.grid(True, which="major", color="#dddddd", linewidth=0.6, zorder=0)
        colour_i = 0
        for p in pts:
            if p.ci is not None and len(p.ci) == 2 and all(_finite(x) for x in p.ci):
                ax.errorbar([p.ppl_ratio], [p.refusal], yerr=[[max(p.refusal - p.ci[0], 0)], [max(p.ci[1] - p.refusal, 0)]],
                            fmt="none", ecolor="#777777", elinewidth=1, capsize=3, zorder=2)
            if p.is_reference:
                ax.scatter([p.ppl_ratio], [p.refusal], marker="*", s=260, color=REFERENCE_COLOUR,
                           edgecolor="white", linewidth=0.8, zorder=4, label=f"{p.name} (reference)")
            else:
                ax.scatter([p.ppl_ratio], [p.refusal], marker=MARKERS[colour_i % len(MARKERS)],
                           s=70, color=OKABE_ITO[colour_i % len(OKABE_ITO)],
                           edgecolor="#C00000" if p.failed else "#333333",
                           linewidth=1.8 if p.failed else 0.6, zorder=3)
                colour_i += 1
        # Labels placed so that no two boxes overlap and none covers another point (fp, rtn-w8a8 and
        # rtn-w4a16 sit almost on top of each other in the demo run).
        to_pt = 72.0 / fig.dpi
        anchors = [tuple(v * to_pt for v in ax.transData.transform((p.ppl_ratio, p.refusal))) for p in pts]
        offsets = place_labels(anchors, [p.name for p in pts], fontsize=9,
                               right_edge=ax.get_window_extent().x1 * to_pt)
        for p, (dx, dy, ha) in zip(pts, offsets):
            ax.annotate(p.name, (p.ppl_ratio, p.refusal), xytext=(dx, dy),
                        textcoords="offset points", ha=ha, va="center",
                        fontsize=9, color="#222222", zorder=5,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
                        arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6} if abs(dy) > 12 else None)

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}×"))
        if use_log:
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("Perplexity ratio to FP" + (" (log scale)" if use_log else "") + "  →  worse language modelling")
        ax.set_ylabel("Refusal rate on harmful prompts  (higher is safer)")
        ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
        ax.legend(loc="upper right", fontsize=8.5, frameon=True, framealpha=0.9)

        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    # Drop the XML declaration and the DOCTYPE (it names an external DTD); an <img> needs neither.
    return svg[svg.index("<svg"):]


def svg_data_uri(svg: str | bytes) -> str:
    """`data:image/svg+xml;base64,...` URI for an inline `<img>`."""
    data = svg.encode("utf-8") if isinstance(svg, str) else svg
    return "data:image/svg+xml;base64," + base64.b64encode(data).decode("ascii")


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...` URI for an inline `<img>`."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def sparkline(values: Sequence[float], width: int = 160, height: int = 36) -> str:
    """A tiny line chart (e.g. a quantizer's loss curve) as SVG text; no axes, min/max marked.

    Drawn by hand rather than with matplotlib: a dozen variants with a curve each would otherwise
    cost a second of rendering for a few pixels of information.
    """
    vals = [v for v in values if _finite(v)]
    if len(vals) < 2:
        vals = (vals or [0.0]) * 2
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    pad = 3
    step = (width - 2 * pad) / (len(vals) - 1)
    pts = " ".join(f"{pad + i * step:.1f},{height - pad - (v - lo) / span * (height - 2 * pad):.1f}"
                   for i, v in enumerate(vals))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><polyline fill="none" stroke="{OKABE_ITO[3]}" '
            f'stroke-width="1.5" points="{pts}"/></svg>')
