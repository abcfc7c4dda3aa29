"""A Linear with a fake-quantized, learnably clipped weight, applied to a few tokens, whose weight
gradient is never materialised.

Q-realign's malicious steps (75% of its calibration) run ``q_proj``, ``o_proj`` and the MLP at
the last prompt token only (:mod:`quantizers.last_token`). For such a Linear, ``y = x Q^T`` with
``x`` one token ``[1, in]``, the gradient of the fake-quantized weight ``Q`` is an outer product,
``G = g^T x``, and the per-step autograd path builds it as a full ``[out, in]`` matrix, then reads
and writes matrices of that size about ten more times (:class:`~quantizers.fake_quant._FusedFakeQuant`'s
backward and the smoothing scale's ``mul`` backward) to reduce it to what learns: one clip ratio
(two, asymmetric) per row and one smoothing factor per input column. Every one of those
reductions is a sum over rows or over columns of ``G`` times a matrix, so with ``G = g^T x`` each
is a matrix-vector product with that matrix (``k`` tokens: a product with ``k`` columns):

* ``sum_j G_ij E_ij = sum_t g_ti (E x_t)_i`` with ``E = out - inside * W'`` (the rounding error
  inside the grid, the clamped value outside), ``W' = W * s`` the smoothed weight;
* ``sum_j G_ij inside_ij = sum_t g_ti (inside x_t)_i`` and ``sum_j G_ij = sum_t g_ti sum_j x_tj``;
* for the smoothing factor ``s_j`` of input column ``j`` (``W'_ij = W_ij s_j``):
  ``dL/ds_j = sum_i dL/dW'_ij W_ij = (1/s_j) sum_i dL/dW'_ij W'_ij``, whose inside part is
  ``sum_t x_tj ((g_t Q)_j - (g_t E)_j)`` (``g_t Q`` is the input's gradient, needed anyway) and
  whose part at the range's extreme elements (the row's max and min, where ``W'_ij`` is the row's
  top or bottom) is a product of their mask with a per-row vector.

Passes over the weight-sized matrices, backward, one token: the input's gradient, ``E`` (in place,
in the quantized weight's memory), ``E x``, ``inside x``, ``g E``, and for a smoothed weight the two
extreme masks (one compare against the stacked bounds), their counts and their product with a
per-row vector (11 matrix traversals, of which 3 write); the autograd route made 16, 7 of them
writing a new matrix (the outer product, ``G * inside``, the error, its product with ``G``, the
two masks, the scale's ``mul`` backward) and 2 updating one in place (the masks' ``addcmul``). The forward is
:func:`~quantizers.fake_quant.fused_quantize` (the same values bit for bit) and the Linear's own
``F.linear``; the gradients equal the autograd path's to float rounding (sums in another order;
``W_ij`` recovered as ``W'_ij / s_j``), tested in ``tests/test_few_token_linear.py``.

Supported: per-output-channel grids (no groups), symmetric or asymmetric, a weight that is
constant (no gradient of its own) and either used as is or multiplied by one learnable factor per
input column (:func:`quantizers.transforms.column_factor`) with no factor exactly 0. Anything else
goes through the autograd path (:func:`few_token_support` says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fake_quant import ClipArg, RangeStats, clip_input_grads, fused_clip_grads, fused_quantize

__all__ = ["MAX_TOKENS", "few_token_support", "few_token_linear"]

#: Most tokens for which the matrix-vector route is used: each token adds a column to three
#: products over the weight that the dense route does not make (it makes one, the outer product),
#: so past some count its elementwise passes are cheaper. On SmolLM2's shapes, one thread, the
#: route was cheaper up to 64 tokens and even at 128 (``bench/bench_few_token_linear.py``,
#: README "Q-realign's calibration cost"): benign calibration prompts (35-58 tokens) use it too.
MAX_TOKENS = 64


def few_token_support(x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor | None,
                      group_size: int | None, bias: torch.Tensor | None = None) -> str | None:
    """None when :func:`few_token_linear` applies to input ``x`` ``[..., in]``, else why not."""
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens > MAX_TOKENS:
        return f"{tokens} tokens (more than {MAX_TOKENS})"
    if group_size is not None:
        return "grouped weight quantization"
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.requires_grad:
        return "the weight is not a constant 2-D float32 tensor"
    if bias is not None and bias.requires_grad:
        return "the bias learns"
    if factor is not None and not bool(factor.detach().ne(0).all()):
        return "a column factor is exactly 0"
    return None


def few_token_linear(x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor | None, bits: int, *,
                     symmetric: bool, clip_ratio: ClipArg, clip_ratio_low: ClipArg | None = None,
                     bias: torch.Tensor | None = None, stats: RangeStats | None = None) -> torch.Tensor:
    """``F.linear(x, fake_quant_weight(weight * factor, ...), bias)`` (``bias`` constant) for
    ``x`` ``[..., in]`` of at most
    :data:`MAX_TOKENS` tokens: the same values, and the gradients to ``x``, ``factor`` (``[in]``,
    or None for a weight used as is) and the clip ratios (per row, ``[out]``) to float rounding,
    without the weight-sized gradient (module docstring). ``stats``: the range of ``weight`` when
    there is no factor (:func:`~quantizers.fake_quant.range_stats`, measured once). Call only where
    :func:`few_token_support` gave None."""
    out_f, in_f = weight.shape
    grouped = weight.view(out_f, 1, in_f)

    def per_row(clip: ClipArg | None) -> ClipArg | None:
        return clip.to(torch.float32).reshape(out_f, 1, 1) if isinstance(clip, torch.Tensor) else clip

    flat = x.reshape(-1, in_f)
    y = _FewTokenLinear.apply(flat, grouped, factor, per_row(clip_ratio), per_row(clip_ratio_low), bias, bits,
                              symmetric, stats if factor is None else None)
    return y.reshape(*x.shape[:-1], out_f)


class _FewTokenLinear(torch.autograd.Function):
    """``y = x Q^T``, ``Q`` the fake-quantized ``W * s``; the backward pass as products with the
    few tokens (module docstring). Its buffers are reused in the backward pass, which therefore
    runs once."""

    @staticmethod
    def forward(ctx, x, weight, factor, clip, clip_low, bias, bits, symmetric, stats):
        w_eff = weight if factor is None else weight * factor  # the values the smoothing parametrisation gives
        out, inside, scale, in_range, stats = fused_quantize(w_eff, clip, clip_low, bits, symmetric, stats)
        y = F.linear(x, out.view(out.shape[0], -1), bias)
        cl = clip if clip_low is None else clip_low
        ctx.bits, ctx.stats, ctx.own_low = bits, stats, clip_low is not None
        ctx.clips = (clip, cl)  # floats, or tensors (saved below)
        ctx.buffers = (w_eff, out, inside, scale, in_range)  # intermediates, not inputs or outputs
        ctx.save_for_backward(x, factor, clip if isinstance(clip, torch.Tensor) else None,
                              cl if isinstance(cl, torch.Tensor) else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        if ctx.buffers is None:
            raise RuntimeError("few_token_linear: the backward pass runs once (its buffers are reused)")
        x, factor, c_t, cl_t = ctx.saved_tensors
        w_eff, out, inside, scale, in_range = ctx.buffers
        ctx.buffers = None
        stats: RangeStats = ctx.stats
        c = c_t if c_t is not None else ctx.clips[0]
        cl = cl_t if cl_t is not None else ctx.clips[1]
        rows = out.shape[0]
        q2, inside2, gy_t = out.view(rows, -1), inside.view(rows, -1), gy.t()  # gy_t [out, tokens]
        gx = gy @ q2  # the input's gradient
        want_factor = factor is not None and ctx.needs_input_grad[2]
        if not (want_factor or any(ctx.needs_input_grad[3:5])):
            return gx, None, None, None, None, None, None, None, None
        err = q2.addcmul_(w_eff.view(rows, -1), inside2, value=-1.0)  # E = out - inside * W', in out's memory
        g_err = torch.linalg.vecdot(err @ x.t(), gy_t).view(rows, 1, 1)  # sum_j G_ij E_ij
        g_inside = g_all = None
        if not stats.symmetric:
            g_inside = torch.linalg.vecdot(inside2 @ x.t(), gy_t).view(rows, 1, 1)  # sum_j G_ij inside_ij
            g_all = (gy_t @ x.sum(dim=-1)).view(rows, 1, 1)  # sum_j G_ij
        d_c, d_cl, pairs = fused_clip_grads(stats, scale, in_range, c, cl if ctx.own_low else None, ctx.bits,
                                            g_err, g_inside, g_all, extremes=want_factor)
        d_factor = None
        if want_factor:
            # sum_i dL/dW'_ij W'_ij; inside the grid: sum_t x_tj (g_t P)_j with P = inside * W' = out - E
            total = torch.linalg.vecdot(x, gx - gy @ err, dim=0)
            # at the range's extremes W' is the row's top and bottom (symmetric: sign(W') max|W'|):
            # one product with the stacked masks
            masks, _ = stats.extreme_masks()
            if stats.symmetric:
                masks = masks.abs()
            at_value = torch.stack([coef.view(rows) * value.view(rows) for (_, coef), value
                                    in zip(pairs, _extreme_values(stats))], dim=-1)  # [rows, k]
            total = total + at_value.view(1, -1) @ masks.view(at_value.numel(), -1)
            d_factor = total.view(-1) / factor
        d_clip, d_low = clip_input_grads(ctx.needs_input_grad[3:5], (c_t, cl_t), (d_c, d_cl))
        return gx, None, d_factor, d_clip, d_low, None, None, None, None


def _extreme_values(stats: RangeStats) -> tuple[torch.Tensor, ...]:
    """Per row, the value ``W'`` takes where each of :meth:`RangeStats.extremes`' masks is set:
    ``max|W'|`` (symmetric, the mask is ``sign(W')`` there), or the top and the bottom."""
    return (stats.absmax,) if stats.symmetric else (stats.top, stats.bottom)
