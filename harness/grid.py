"""Recovering the integer grid under a saved variant's fake-quantized weights.

A saved variant stores weights already rounded (``w = s * q``) but not the scales ``s``: exporting
it to a format that stores integers and scales (GGUF blocks, compressed-tensors) needs them back.
Shared by both exporters so they agree on what "the variant's grid" is.
"""

from __future__ import annotations

import numpy as np

#: Distance from the nearest integer below which ``w / s`` counts as on the grid (weights are
#: float32 products ``s * q``; a wrong scale leaves ratios like 0.5 or 0.33).
GRID_TOLERANCE = 1e-3


def signed_range(bits: int) -> tuple[int, int]:
    """The integers a symmetric ``bits``-bit format holds: ``[-2^(b-1), 2^(b-1) - 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def grid_scales(weight: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Per-group scales ``(rows, cols // group)`` with every weight equal to ``s * q`` for an
    integer ``q`` in :func:`signed_range` of ``bits``; ``group`` is the scheme's group size (the
    row length when per channel).

    ``s = absmax / k`` for the largest ``k <= 2^(bits-1)`` that puts the whole group on integers
    inside the range (any such ``k`` reproduces the weights exactly). Raises ValueError when a
    group lies on no such grid (a method moved weights after rounding).
    """
    lo, hi = signed_range(bits)
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"{cols} input columns are not whole groups of {group}")
    groups = weight.reshape(rows, cols // group, group).astype(np.float64)
    absmax = np.abs(groups).max(axis=-1)
    scales = np.zeros_like(absmax)
    todo = absmax > 0
    for k in range(2 ** (bits - 1), 0, -1):
        if not todo.any():
            break
        s = absmax[todo] / k
        ratio = groups[todo] / s[:, None]
        rounded = np.rint(ratio)
        ok = (np.abs(ratio - rounded).max(axis=-1) < GRID_TOLERANCE) & (rounded.min(axis=-1) >= lo) \
            & (rounded.max(axis=-1) <= hi)
        rows_idx, group_idx = np.nonzero(todo)
        scales[rows_idx[ok], group_idx[ok]] = s[ok]
        todo[rows_idx[ok], group_idx[ok]] = False
    if todo.any():
        raise ValueError(f"{int(todo.sum())} groups of {group} weights lie on no symmetric {bits}-bit grid")
    return scales
