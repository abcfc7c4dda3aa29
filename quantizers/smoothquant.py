"""SmoothQuant (``smoothquant``): migrate activation outliers into the weights, per channel.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438). At each scale site the
activation ``X`` is divided by ``s`` and the consuming weights ``W`` multiplied by it, with

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

(``max|X_j|`` over the calibration data, ``max|W|`` over every consumer's column ``j``), then the
weights are quantized (RTN or GPTQ) and activations fake-quantized per token. The paper smooths the
inputs of the linears after each norm (``norm_qkv``, ``norm_mlp``, the default); ``vo`` and
``updown`` (OmniQuant / Outlier Suppression+ sites) can be added with ``sites``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import QuantContext, QuantizerError, register_quantizer
from .calibration import input_channel_absmax
from .scheme import QuantScheme
from .transforms import (
    Scale,
    ScaleSite,
    TransformQuantizer,
    WeightStepOptions,
    fuse_chains,
    scale_sites,
    site_chains,
)

__all__ = ["SmoothQuantOptions", "SmoothQuantQuantizer", "smoothing_scales"]

_SMOOTH_SITES = ("norm_qkv", "norm_mlp", "vo", "updown")


@dataclass(frozen=True)
class SmoothQuantOptions(WeightStepOptions):
    """``alpha``: migration strength in [0, 1] (0.5, the paper's default; larger moves more of the
    activation range into the weights). ``sites``: ``+``-separated scale sites, from
    ``norm_qkv``, ``norm_mlp``, ``vo``, ``updown`` (default ``norm_qkv+norm_mlp``, as in the paper).
    ``min_scale``: floor of ``s`` (1e-5) so that dead channels do not divide by zero.
    Plus the weight step's ``weights`` (auto|rtn|gptq) and ``mse_clip``."""

    alpha: float = 0.5
    sites: str = "norm_qkv+norm_mlp"
    min_scale: float = 1e-5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise QuantizerError(f"alpha={self.alpha} must be in [0, 1]; the paper uses 0.5")
        if self.min_scale <= 0:
            raise QuantizerError(f"min_scale={self.min_scale} must be positive")
        bad = [s for s in self.site_kinds if s not in _SMOOTH_SITES]
        if bad or not self.site_kinds:
            raise QuantizerError(
                f"sites={self.sites!r}: use +-separated names from {', '.join(_SMOOTH_SITES)}, e.g. norm_qkv+norm_mlp"
            )

    @property
    def site_kinds(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.sites.split("+") if s.strip())


def _gather_max(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[k] = max(values[c] for c with index[c] == k)``."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index.to(values.device), values, reduce="amax", include_self=True)


def smoothing_scales(
    site: ScaleSite, act_max: dict[str, torch.Tensor], alpha: float, min_scale: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's ``s`` for one site from the consumers' input maxima ``act_max[name]``."""
    if not site.consumers:
        raise QuantizerError(f"site {site.name} has no consuming linear; SmoothQuant cannot set its scale")
    a = torch.zeros(site.size)
    w = torch.zeros(site.size)
    for name, linear, index in site.consumers:
        if name not in act_max:
            raise QuantizerError(f"no activation statistics for {name}; the calibration data never reached it")
        a = torch.maximum(a, _gather_max(act_max[name].float().cpu(), index, site.size))
        col = linear.weight.detach().abs().amax(dim=0).float().cpu()
        w = torch.maximum(w, _gather_max(col, index, site.size))
    s = a.pow(alpha) / w.clamp(min=min_scale).pow(1.0 - alpha)
    s = torch.where(a > 0, s, torch.ones_like(s))  # channels never active: leave them alone
    return s.clamp(min=min_scale)


@register_quantizer
class SmoothQuantQuantizer(TransformQuantizer):
    """Per-channel smoothing with calibration maxima, then the weight step."""

    name = "smoothquant"
    description = "SmoothQuant: per-channel activation-to-weight scale migration (alpha), then RTN/GPTQ weights"
    Options = SmoothQuantOptions
    requires_calibration = True

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        opts: SmoothQuantOptions = self.options
        parts = self.prepare(model, scheme)
        sites = scale_sites(parts, opts.site_kinds)
        names = {name for site in sites for name, _, _ in site.consumers}
        act_max = input_channel_absmax(model, ctx.calibration_batches, lambda n, _m: n in names)
        scales = {site.name: Scale(init=smoothing_scales(site, act_max, opts.alpha, opts.min_scale)) for site in sites}
        fuse_chains(site_chains(sites, scales))
        spread = [float(sc.vector().max() / sc.vector().min()) for sc in scales.values()]
        self.metadata["smoothing"] = {"alpha": opts.alpha, "sites": list(opts.site_kinds), "n_sites": len(sites),
                                      "max_scale_spread": round(max(spread), 3)}
        self.weight_step(model, scheme, ctx)
        return model
