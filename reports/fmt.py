"""Number and value formatting shared by the report, the comparison page and the gate summary."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any


def fmt_pct(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.1f}%"


def fmt_pts(delta: float | None) -> str:
    """A change of rate in percentage points, signed: '+3.0 pts', '−52.0 pts'."""
    if delta is None:
        return ""
    pts = delta * 100
    if abs(pts) < 0.05:
        return "±0.0 pts"
    return f"{'+' if pts > 0 else '−'}{abs(pts):.1f} pts"


def fmt_ppl(ppl: float | None) -> str:
    if ppl is None:
        return "—"
    if math.isinf(ppl):
        return "∞"
    if ppl >= 10000:
        return f"{ppl:,.0f}"
    if ppl >= 100:
        return f"{ppl:.1f}"
    return f"{ppl:.2f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    if math.isinf(ratio):
        return "∞×"
    if ratio >= 100:
        return f"{ratio:,.0f}×"
    return f"{ratio:.2f}×"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h} h {rem // 60:02d} min"


def fmt_time(iso: Any) -> str:
    if not isinstance(iso, str) or not iso:
        return "unknown time"
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
        return dt.strftime("%Y-%m-%d %H:%M:%S UTC")
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def fmt_value(v: Any) -> str:
    """Generic value for provenance tables."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        if all(not isinstance(x, (dict, list)) for x in v):
            return ", ".join(fmt_value(x) for x in v) if v else "[]"
        return json.dumps(v, ensure_ascii=False, default=str)
    if isinstance(v, dict) and not v:
        return "{}"
    return str(v)


def flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict -> [(dotted.key, formatted value)] in the dict's own order."""
    if not isinstance(d, dict):
        return [(prefix or "value", fmt_value(d))]
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key))
        else:
            out.append((key, fmt_value(v)))
    return out
