"""Fake quantization: quantize to an integer grid and dequantize again, in floating point.

Every function returns a tensor of the input's shape and dtype whose values lie on the integer
grid. Arithmetic runs in float32 (float64 inputs stay float64) and is cast back at the end.
Rounding uses a straight-through estimator (:func:`round_ste`), so gradients flow to the input and
to any tensor-valued clip ratio (learnable clipping); ``clamp`` passes no gradient outside the
grid, as in OmniQuant/LSQ.

All quantization here is along the last dimension, optionally in groups of ``group_size``
consecutive elements:

* weights ``[out, in]``: one scale per output channel (row) or per group of input columns;
* activations ``[..., tokens, features]``: one scale per token (dynamic);
* KV cache ``[batch, heads, tokens, head_dim]``: one scale (+ zero point) per token per group
  (group = head_dim by default).

Symmetric (W4A4.md)::

    qmax = 2^(b-1) - 1;  scale = clip * max|x| / qmax;  q = clamp(round(x / scale), -2^(b-1), qmax)

Asymmetric (the range always contains 0, so 0 is exact)::

    lo = clip_low * min(min x, 0);  hi = clip * max(max x, 0);  scale = (hi - lo) / (2^b - 1)
    zero = round(-lo / scale);  q = clamp(round(x / scale) + zero, 0, 2^b - 1);  x' = (q - zero) * scale

An all-zero group gets scale 1 (it dequantizes to zeros, never NaN).
"""

from __future__ import annotations

import torch

__all__ = [
    "round_ste",
    "fake_quant",
    "fake_quant_weight",
    "fake_quant_activation",
    "fake_quant_kv",
    "mse_clip_search",
    "grid_params",
    "quantize_to_grid",
    "RangeStats",
    "range_stats",
]

ClipArg = float | torch.Tensor


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _group(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``[..., n]`` as ``[..., ceil(n / g), g]`` (``g = n`` when ``group_size`` is None).

    When ``g`` does not divide ``n`` the last group is zero-padded. Padding is exact: zeros change
    neither ``max|x|`` nor the asymmetric range (which always contains 0), and quantize to 0.
    """
    n = x.shape[-1]
    g = n if group_size is None else int(group_size)
    if g < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    pad = (-n) % g
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (n + pad) // g, g)


def _ungroup(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_group`: flatten the groups and drop the padding."""
    return x.reshape(*x.shape[:-2], -1)[..., : shape[-1]]


def _expand_clip(clip: ClipArg | None, grouped: torch.Tensor) -> ClipArg | None:
    """Bring a tensor clip ratio to the ``[..., ngroups, 1]`` statistics shape.

    Accepted: a float; a tensor of the leading shape (one ratio per row / token, e.g. ``[out]``
    for weights); a tensor of ``[..., ngroups]`` (one per group); or anything that already
    broadcasts against ``[..., ngroups, 1]``.
    """
    if clip is None or not isinstance(clip, torch.Tensor):
        return clip
    lead = grouped.shape[:-2]
    clip = clip.to(grouped.dtype)
    if clip.dim() > 0 and tuple(clip.shape) == tuple(lead):
        return clip.unsqueeze(-1).unsqueeze(-1)
    if clip.dim() > 0 and tuple(clip.shape) == tuple(grouped.shape[:-1]):
        return clip.unsqueeze(-1)
    return clip


def _grid_params(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipArg,
    clip_low: ClipArg | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and asymmetric zero point) of each last-dim vector of ``x`` ``[..., g]``, keepdim."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = x.abs().amax(dim=-1, keepdim=True) * clip
        scale = absmax / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    qmax = 2**bits - 1
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0) * (clip if clip_low is None else clip_low)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0) * clip
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, round_ste(-lo / scale)


def _to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round ``x`` onto the grid given by ``scale``/``zero`` (``zero is None``: symmetric) and dequantize."""
    if zero is None:
        q = torch.clamp(round_ste(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return q * scale
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def _fq_grouped(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipArg,
    clip_low: ClipArg | None,
) -> torch.Tensor:
    """Fake-quantize ``x`` of shape ``[..., g]`` with one scale per last-dim vector (compute dtype)."""
    scale, zero = _grid_params(x, bits, symmetric, clip, clip_low)
    return _to_grid(x, scale, zero, bits)


class RangeStats:
    """Per-vector range of a tensor ``x`` ``[..., g]`` (grouped, compute dtype) and where it is
    reached: what :class:`_FusedFakeQuant` needs of ``x`` besides ``x`` itself.

    ``bottom``/``top`` are ``min``/``max`` of each last-dim vector (keepdim). :meth:`extremes`
    gives float masks of the elements at the upper and lower end of the range (asymmetric: at
    ``max`` and ``min``; symmetric: at ``max|x|``, signed, ``+1`` at ``+max|x|`` and ``-1`` at
    ``-max|x|``) with the number of such elements per vector: ties share the range's gradient
    evenly, as autograd's ``amax``/``amin`` backward does. A constant tensor (a weight no
    learnable transform changes) is measured once with :func:`range_stats` and passed to every
    ``fake_quant(..., fused=True, stats=...)`` call, which then skips those passes.
    """

    def __init__(self, x: torch.Tensor, symmetric: bool) -> None:
        self.bottom = x.amin(dim=-1, keepdim=True)
        self.top = x.amax(dim=-1, keepdim=True)
        self.symmetric = symmetric
        self._x: torch.Tensor | None = x
        self._extremes: tuple | None = None

    @property
    def absmax(self) -> torch.Tensor:
        """``max|x|`` per vector, equal to ``x.abs().amax(-1, keepdim=True)`` (abs is exact)."""
        return torch.maximum(self.top, -self.bottom)

    def extreme_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masks, counts)``: the extremes' float masks stacked on a new next-to-last dimension,
        ``[..., k, g]`` with ``k = 1`` (symmetric: ``sign(x)`` where ``|x|`` is the maximum) or 2
        (asymmetric: at the top, at the bottom), and their counts ``[..., k, 1]``. One comparison
        against the stacked bounds writes every mask (a float output, several times faster on the
        CPU than a bool mask). Computed on first use (the backward pass)."""
        if self._extremes is None:
            x = self._x
            k = 1 if self.symmetric else 2
            out = x.new_empty((*x.shape[:-1], k, x.shape[-1]))
            if self.symmetric:
                masks = torch.eq(x.abs().unsqueeze(-2), self.absmax.unsqueeze(-2), out=out)
            else:
                bounds = torch.stack((self.top, self.bottom), dim=-2)  # [..., 2, 1]
                masks = torch.eq(x.unsqueeze(-2), bounds, out=out)
            counts = masks.sum(dim=-1, keepdim=True)
            if self.symmetric:
                masks.copysign_(x.unsqueeze(-2))  # sign(x) where |x| is the maximum
            self._extremes = (masks, counts)
            self._x = None
        return self._extremes

    def extremes(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """``((mask, count), ...)``: one pair for symmetric, (upper, lower) for asymmetric; masks of
        ``x``'s shape (views into :meth:`extreme_masks`), counts ``[..., 1]``."""
        masks, counts = self.extreme_masks()
        return tuple((masks[..., k, :], counts[..., k, :]) for k in range(masks.shape[-2]))

    def release_input(self) -> None:
        """Drop the reference to ``x`` until :meth:`restore_input`. An autograd node keeps ``x``
        through ``save_for_backward``, which gradient checkpointing frees and recomputes; a plain
        Python reference from the node (``ctx.stats``) would keep every layer's input alive until
        the backward pass and undo the checkpointing."""
        if self._extremes is None:
            self._x = None

    def restore_input(self, x: torch.Tensor) -> None:
        """Give back the ``x`` these statistics were measured on (the node's saved tensor)."""
        if self._extremes is None and self._x is None:
            self._x = x

    def matches(self, x: torch.Tensor, symmetric: bool) -> bool:
        return symmetric == self.symmetric and tuple(self.top.shape[:-1]) == tuple(x.shape[:-1])


def range_stats(x: torch.Tensor, *, group_size: int | None = None, symmetric: bool = True) -> RangeStats:
    """:class:`RangeStats` of ``x`` as :func:`fake_quant` groups it (compute dtype), for a tensor
    fake-quantized many times without changing (its extremes are measured once, if ever needed)."""
    return RangeStats(_group(x.detach().to(_compute_dtype(x)), group_size), symmetric)


def fused_quantize(x: torch.Tensor, clip: ClipArg, clip_low: ClipArg | None, bits: int, symmetric: bool,
                   stats: RangeStats | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, RangeStats]:
    """The forward pass of :class:`_FusedFakeQuant` on ``x`` ``[..., g]`` (one scale per last-dim
    vector; ``clip``/``clip_low`` broadcast against ``[..., 1]``): ``(out, inside, scale, in_range,
    stats)``, ``out`` the fake-quantized values, ``inside`` a float mask (1.0 where the element lies
    on the grid, 0.0 where it was clamped), ``in_range`` where the range is not empty. Also the
    forward of the nodes that fuse the fake-quant with what follows it
    (:mod:`quantizers.few_token_linear`): the same values bit for bit.

    The passes over ``x``: ``amin``/``amax`` (skipped with cached ``stats``), divide, round, clamp
    (the asymmetric zero point moves into the clamp bounds: ``clamp(q + z, 0, qmax) - z ==
    clamp(q, -z, qmax - z)`` for whole numbers, the same values, except that a weight rounding to
    zero from below is ``-0.0``), a float compare for ``inside`` (in the rounded codes' memory),
    the rescale."""
    c = clip
    cl = clip if clip_low is None else clip_low
    if stats is None or not stats.matches(x, symmetric):
        stats = RangeStats(x, symmetric)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale0 = stats.absmax * c / qmax
    else:
        qmin, qmax = 0, 2**bits - 1
        lo_raw = torch.clamp(stats.bottom, max=0.0)
        scale0 = (torch.clamp(stats.top, min=0.0) * c - lo_raw * cl) / qmax
    in_range = scale0 > 0
    scale = torch.where(in_range, scale0, torch.ones_like(scale0))
    q = torch.div(x, scale).round_()
    if symmetric:
        out = torch.clamp(q, qmin, qmax)
    else:
        zero = torch.round(-(lo_raw * cl) / scale)
        # clamp with two tensor bounds is slow on the CPU; clamp_min + clamp_max_ are not
        out = torch.clamp_min(q, -zero).clamp_max_(qmax - zero)
    inside = torch.eq(q, out, out=q)  # float, in q's memory: 1.0 inside the grid, 0.0 where clamped
    out.mul_(scale)
    return out, inside, scale, in_range, stats


def fused_clip_grads(
    stats: RangeStats, scale: torch.Tensor, in_range: torch.Tensor, clip: ClipArg, clip_low: ClipArg | None,
    bits: int, g_err: torch.Tensor, g_inside: torch.Tensor | None, g_all: torch.Tensor | None, extremes: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The straight-through gradients of :func:`fused_quantize`'s range, from three sums per
    last-dim vector of the upstream gradient ``G`` (each ``[..., 1]``): ``g_err = sum(G * (out -
    inside * x))``, ``g_inside = sum(G * inside)`` and ``g_all = sum(G)`` (the last two only for
    asymmetric grids; None when symmetric). Returns ``(d_clip, d_clip_low, extremes)``:
    ``d_clip_low`` is None unless the lower bound has its own ratio (``clip_low`` given), and with
    ``extremes`` the ``(mask, coefficient)`` pairs of the range's extreme elements: ``dL/dx = G *
    inside + sum(mask * coefficient)`` (ties share the range's gradient evenly, as ``amax`` does).

    ``dL/ds = g_err / s`` (asymmetric, plus the zero point's share ``-sum(G * outside) * lo / s``,
    ``lo`` the clipped lower bound), then through ``s = (hi - lo) / qmax`` to the clip ratios."""
    c = clip
    cl = clip if clip_low is None else clip_low
    d_scale = g_err / scale
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if stats.symmetric:
        qmax = 2 ** (bits - 1) - 1
        d_scale0 = torch.where(in_range, d_scale, 0.0)
        d_top_clipped = d_scale0 / qmax  # d(top * c)
        d_c, d_cl = d_top_clipped * stats.absmax, None
        if extremes:
            (at, count), = stats.extremes()  # sign(x) where |x| is the maximum
            pairs.append((at, d_top_clipped * c / count))
        return d_c, d_cl, pairs
    qmax = 2**bits - 1
    lo_raw = torch.clamp(stats.bottom, max=0.0)
    outside = g_all - g_inside  # sum(G) where clamped
    d_scale = d_scale - outside * (lo_raw * cl) / scale  # the zero point's share
    d_scale0 = torch.where(in_range, d_scale, 0.0)
    d_hi = d_scale0 / qmax
    d_lo = outside - d_scale0 / qmax
    d_c = d_hi * torch.clamp(stats.top, min=0.0)
    d_cl = d_lo * lo_raw
    if clip_low is None:
        d_c, d_cl = d_c + d_cl, None
    if extremes:
        (at_hi, n_hi), (at_lo, n_lo) = stats.extremes()
        for at, n, d_ext, keep in ((at_hi, n_hi, d_hi * c, stats.top >= 0),
                                   (at_lo, n_lo, d_lo * cl, stats.bottom <= 0)):
            pairs.append((at, torch.where(keep, d_ext, 0.0) / n))
    return d_c, d_cl, pairs


def clip_input_grads(ctx_needs: tuple[bool, ...], clips: tuple[ClipArg, ClipArg | None],
                     grads: tuple[torch.Tensor | None, torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The clip ratios' gradients an autograd node returns: each summed to its ratio's shape, None
    for a float ratio or one that needs none (``ctx_needs``: the node's ``needs_input_grad`` for
    the two ratios)."""
    out: list[torch.Tensor | None] = [None, None]
    for i, (t, d) in enumerate(zip(clips, grads)):
        if isinstance(t, torch.Tensor) and d is not None and ctx_needs[i]:
            out[i] = d.sum_to_size(t.shape)
    return out


class _FusedFakeQuant(torch.autograd.Function):
    """:func:`_fq_grouped` with its straight-through gradient written out by hand.

    Autograd through :func:`_fq_grouped` records about fifteen full-size elementwise ops and
    replays twice as many in the backward pass; for learnable weight clipping, where the weights
    are re-quantized at every step, those passes over the weight matrices cost more than the
    block's matmuls (Q-realign on SmolLM2). This node makes few passes over ``x`` and only cheap
    ones (float outputs, scalar or broadcast operands; no bool masks, no index ops, which are
    several times slower on the CPU): the forward is :func:`fused_quantize`. With ``x`` of shape
    ``[..., g]`` and one scale ``s`` (and zero point ``z``) per last-dim vector, ``out =
    (clamp(round(x / s) + z, lo, hi) - z) * s``:

    * ``dL/dx = G * inside`` plus, at the range's extreme elements, the gradient of the range;
    * the clip ratios' gradients from three sums per vector (:func:`fused_clip_grads`).

    Equal to autograd's gradients to float rounding (``tests/test_fake_quant.py``).
    """

    @staticmethod
    def forward(ctx, x, clip, clip_low, bits, symmetric, stats):
        out, inside, scale, in_range, used = fused_quantize(x, clip, clip_low, bits, symmetric, stats)
        if used is not stats:  # measured here on x: x itself is saved below, not held by the statistics
            used.release_input()
        stats = used
        cl = clip if clip_low is None else clip_low
        ctx.bits, ctx.own_low = bits, clip_low is not None
        ctx.clips = (clip, cl)  # floats, or tensors (saved below)
        ctx.stats = stats
        ctx.save_for_backward(x, out, scale, inside, in_range,
                              clip if isinstance(clip, torch.Tensor) else None,
                              cl if isinstance(cl, torch.Tensor) else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, scale, inside, in_range, c_t, cl_t = ctx.saved_tensors
        stats: RangeStats = ctx.stats
        stats.restore_input(x)
        c = c_t if c_t is not None else ctx.clips[0]
        cl = cl_t if cl_t is not None else ctx.clips[1]
        want_x = ctx.needs_input_grad[0]  # False for a constant weight: only the clip ratios learn
        gx = grad * inside if want_x else None
        # sum(G * (out - inside * x)): the product in place in the difference's memory (vecdot
        # would allocate another full-size tensor for it)
        g_err = torch.addcmul(out, x, inside, value=-1.0).mul_(grad).sum(dim=-1, keepdim=True)
        g_inside = g_all = None
        if not stats.symmetric:
            g_inside = (gx.sum(dim=-1) if want_x else torch.linalg.vecdot(grad, inside)).unsqueeze(-1)
            g_all = grad.sum(dim=-1, keepdim=True)
        d_c, d_cl, pairs = fused_clip_grads(stats, scale, in_range, c, cl if ctx.own_low else None, ctx.bits,
                                            g_err, g_inside, g_all, extremes=want_x)
        for at, coef in pairs:
            gx.addcmul_(at, coef)
        d_clip, d_low = clip_input_grads(ctx.needs_input_grad[1:3], (c_t, cl_t), (d_c, d_cl))
        return gx, d_clip, d_low, None, None, None


def grid_params(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    clip_ratio: ClipArg = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` that :func:`fake_quant` would use for each row of ``x`` ``[rows, n]``
    (one group per row), each of shape ``[rows, 1]``; ``zero`` is ``None`` when symmetric.

    For methods that fix the grid first and round later (GPTQ rounds one column at a time with
    scales computed from the whole row or group); pair with :func:`quantize_to_grid`.
    """
    _check_bits(bits)
    xc = x.to(_compute_dtype(x))
    clip = clip_ratio.to(xc.dtype).reshape(-1, 1) if isinstance(clip_ratio, torch.Tensor) else clip_ratio
    return _grid_params(xc, bits, symmetric, clip, None)


def quantize_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Fake-quantize ``x`` on a given grid (from :func:`grid_params`; shapes broadcast), same formula
    as :func:`fake_quant`. Returns the compute dtype."""
    _check_bits(bits)
    return _to_grid(x.to(scale.dtype), scale, zero, bits)


def fake_quant(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: ClipArg = 1.0,
    clip_ratio_low: ClipArg | None = None,
    fused: bool = False,
    stats: RangeStats | None = None,
) -> torch.Tensor:
    """Fake-quantize along the last dimension, one scale per vector or per ``group_size`` elements.

    ``clip_ratio`` scales the range (``max|x|`` when symmetric, the upper bound when asymmetric);
    ``clip_ratio_low`` scales the lower bound of the asymmetric range (defaults to ``clip_ratio``).
    Either may be a tensor (see :func:`_expand_clip` for shapes); gradients flow into it.
    ``bits >= 16`` returns ``x`` unchanged. ``fused``: the same values and (to float rounding)
    gradients from one hand-written autograd node (:class:`_FusedFakeQuant`), several times
    cheaper in the backward pass; for tensors re-quantized at every training step. ``stats``
    (fused only): the :func:`range_stats` of ``x``, measured once for a tensor that does not
    change between calls (it must be ``x``'s; ignored when its shape or symmetry does not fit).
    """
    _check_bits(bits)
    if bits >= 16:
        return x
    dtype = x.dtype
    xc = x.to(_compute_dtype(x))
    grouped = _group(xc, group_size)
    clip = _expand_clip(clip_ratio, grouped)
    clip_low = _expand_clip(clip_ratio_low, grouped)
    if fused:
        out = _FusedFakeQuant.apply(grouped, clip, clip_low, bits, symmetric, stats)
    else:
        out = _fq_grouped(grouped, bits, symmetric, clip, clip_low)
    return _ungroup(out, x.shape).to(dtype)


def fake_quant_weight(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: ClipArg = 1.0,
    clip_ratio_low: ClipArg | None = None,
    fused: bool = False,
    stats: RangeStats | None = None,
) -> torch.Tensor:
    """Weight ``[out, in]``: per output channel (``group_size=None``) or per group of input columns.

    ``clip_ratio`` may be a per-row ``[out]`` or per-group ``[out, in // group_size]`` tensor, e.g.
    the result of :func:`mse_clip_search` or a learnable parameter; ``fused`` and ``stats`` as in
    :func:`fake_quant`.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    return fake_quant(
        weight, bits, group_size=group_size, symmetric=symmetric, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        fused=fused, stats=stats,
    )


def fake_quant_activation(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    clip_ratio: ClipArg = 1.0,
    fused: bool = False,
) -> torch.Tensor:
    """Dynamic per-token quantization of ``x`` ``[..., features]`` (every leading index is a token);
    ``fused`` as in :func:`fake_quant`."""
    return fake_quant(x, bits, symmetric=symmetric, clip_ratio=clip_ratio, fused=fused)


def fake_quant_kv(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: ClipArg = 1.0,
) -> torch.Tensor:
    """KV-cache states ``[batch, heads, tokens, head_dim]``: per token, per group of ``group_size``
    channels of each head (``None`` = the whole head), asymmetric by default.

    Quantization of one token never depends on another token, so quantizing the whole cache at
    every step gives exactly what a cache storing quantized entries would hold. With
    ``clip_ratio == 1`` it is also idempotent (asymmetric: the dequantized vector spans exactly
    ``[-zero * scale, (2^b - 1 - zero) * scale]``, which gives back the same scale and zero point;
    symmetric: the largest magnitude lands on ``qmax * scale``); with ``clip_ratio < 1`` it is
    not (each pass clips the range again), so callers must quantize full-precision states.
    """
    return fake_quant(x, bits, group_size=group_size, symmetric=symmetric, clip_ratio=clip_ratio)


@torch.no_grad()
def mse_clip_search(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
    chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """Per-row (per-group) clip ratio minimising ``sum |w - Q(w)|^norm``.

    Candidates are ``1 - i / grid`` for ``i = 0 .. floor(max_shrink * grid)``, i.e. 1.0 down to
    0.2 in steps of 0.01 by default; ties keep the larger ratio. Returns a tensor of shape
    ``[out]`` (no groups) or ``[out, ceil(in / group_size)]`` in the compute dtype, to pass as
    ``clip_ratio`` to :func:`fake_quant_weight`. Rows are processed in chunks of about
    ``chunk_elements`` values to bound memory.
    """
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError("grid must be >= 1 and max_shrink in [0, 1)")
    w = _group(weight.detach().to(_compute_dtype(weight)), group_size)  # [out, ngroups, g]
    best = torch.ones(w.shape[:-1], dtype=w.dtype, device=w.device)
    if bits < 16:
        ratios = [1.0 - i / grid for i in range(int(max_shrink * grid + 1e-9) + 1)]
        rows = max(1, chunk_elements // max(1, w.shape[1] * w.shape[2]))
        for start in range(0, w.shape[0], rows):
            best[start : start + rows] = _search_chunk(w[start : start + rows], bits, symmetric, ratios, norm)
    return best if group_size is not None else best.squeeze(-1)


def _search_chunk(w: torch.Tensor, bits: int, symmetric: bool, ratios: list[float], norm: float) -> torch.Tensor:
    """Clip search on ``[rows, ngroups, g]``. Works in units of the unclipped scale ``s``: with
    ``r = w / s`` the candidate ``p`` gives ``Q(w) = s * p * clamp(round(r / p) + z, ...) - ...``,
    and the per-group factor ``s^norm`` does not change which ``p`` is best. The asymmetric zero
    point ``round(-lo / (p * s))`` does not depend on ``p`` either, since ``lo`` scales with it."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        base = w.abs().amax(dim=-1, keepdim=True) / qmax
        zero = None
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = torch.clamp(w.amin(dim=-1, keepdim=True), max=0.0)
        hi = torch.clamp(w.amax(dim=-1, keepdim=True), min=0.0)
        base = (hi - lo) / qmax
        base = torch.where(base > 0, base, torch.ones_like(base))
        zero = torch.round(-lo / base)
    base = torch.where(base > 0, base, torch.ones_like(base))
    r = w / base
    best_err = torch.full(w.shape[:-1], float("inf"), dtype=w.dtype, device=w.device)
    best = torch.ones_like(best_err)
    q = torch.empty_like(r)
    for p in ratios:
        torch.mul(r, 1.0 / p, out=q)
        q.round_()
        if zero is not None:
            q.add_(zero).clamp_(qmin, qmax).sub_(zero)
        else:
            q.clamp_(qmin, qmax)
        q.mul_(p).sub_(r).abs_()
        err = (q.square_() if norm == 2.0 else q.pow_(norm)).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, p), best)
    return best
