"""GPTQ weight quantization and the shared weight step every transform method ends with.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323) rounds a layer's weight one input column
at a time and spreads each column's rounding error over the columns not yet rounded, weighted by
the inverse Hessian ``H = 2/n sum x x^T`` of the layer input (Optimal Brain Quantization with a
fixed column order, lazy block updates, and the Cholesky factor of ``H^-1``). It minimises the
layer's output error ``||X W^T - X W_q^T||`` rather than the weight error RTN minimises.

The shared weight step (stable signature; smoothquant, quarot, ost, aaq and qrealign call it
after their transforms)::

    quantize_weights(model, scheme, *, method="rtn" | "gptq", batches=None,
                     options: GPTQOptions | RTNOptions | None = None,
                     input_transforms: Mapping[str, nn.Module] | None = None,
                     progress=None, stats: dict | None = None) -> list[str]

* Every ``nn.Linear`` the scheme does not skip becomes a :class:`~quantizers.modules.QuantLinear`
  with the scheme's weight, activation and (per module) input-transform settings, through
  :func:`~quantizers.modules.quantize_linear_layers`. Returns the replaced module names.
* ``method="rtn"`` gives exactly the ``rtn`` quantizer's weights (same options: ``-wmse`` with
  ``mse_grid``/``mse_max_shrink``/``mse_norm``). ``method="gptq"`` needs ``batches`` (calibration
  batches as in :class:`~quantizers.base.QuantContext`), else :class:`QuantizerError`.
* A model whose targets are *already* ``QuantLinear`` with ``w_bits == 16`` (a transform method
  that trained with activation quantization on) is accepted: those modules keep their identity
  and ``input_transform`` and get their weight quantized in place; their ``w_bits``/``a_bits``/
  ``a_symmetric``/``a_clip_ratio`` are then set from ``scheme`` (the scheme is the single source
  of truth). ``input_transforms`` may name such a module only if it has no transform yet.
  Targets that already have quantized weights, or a mix of ``QuantLinear`` and plain
  ``nn.Linear`` targets, raise :class:`QuantizerError`.
* GPTQ's Hessians see each input as the matmul does (after the online ``input_transform``) but in
  full precision: activation fake-quant is off during the calibration pass (as in QuaRot's GPTQ
  step). KV-cache fake-quant, if the caller enabled it, stays on.
* Sequential (paper, Section 4): layer ``i``'s Hessians come from inputs produced by layers
  ``0..i-1`` with their *quantized* weights; layer ``i`` is then quantized and its quantized
  outputs feed layer ``i+1``. Linears outside the decoder stack (``lm_head`` under ``noskip``)
  get RTN weights. Linears that read the same input tensor (q/k/v, gate/up) share one Hessian and
  are quantized together as one stacked matrix (GPTQ is independent per output row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .base import QuantContext, Quantizer, QuantizerError, register_quantizer
from .calibration import run_layer
from .fake_quant import grid_params, mse_clip_search, quantize_to_grid
from .modules import QuantLinear, enable_kv_quant, quantize_linear_layers
from .pipeline import BlockPipeline
from .rtn import RTNOptions, RTNQuantizer
from .scheme import QuantScheme

__all__ = ["GPTQOptions", "GPTQQuantizer", "gptq_quantize", "quantize_weights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions(RTNOptions):
    """GPTQ settings (plus RTN's MSE clip-search settings, used when clipping is on).

    ``damp``: added to H's diagonal as a fraction of its mean (the paper's 1%). ``block_size``:
    columns per lazy-update block (128 as in the paper; changes speed, not the result beyond
    float rounding). ``act_order``: process columns by decreasing ``diag(H)`` (the reference code's
    ``--act-order``); with weight groups the group scales are then computed up front from the
    unquantized weight ("static groups"), so groups stay contiguous input columns as the scheme
    says. ``mse_clip``: MSE-searched clip ratios (as ``-wmse`` asks) even if the scheme does not
    say ``-wmse``; W4A4.md's recipe is GPTQ with MSE clipping.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    mse_clip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.damp < 1.0:
            raise QuantizerError(f"damp must be in (0, 1), got {self.damp}; the paper uses 0.01")
        if self.block_size < 1:
            raise QuantizerError(f"block_size must be >= 1, got {self.block_size}")


# ---------------------------------------------------------------------- GPTQ core
def _grid(w: torch.Tensor, scheme: QuantScheme, options: RTNOptions, clip_search: bool):
    """Scale/zero of each row of ``w`` (one group per row), MSE-clipped if asked."""
    clip: float | torch.Tensor = 1.0
    if clip_search:
        clip = mse_clip_search(
            w, scheme.w_bits, symmetric=scheme.w_symmetric,
            grid=options.mse_grid, max_shrink=options.mse_max_shrink, norm=options.mse_norm,
        )
    return grid_params(w, scheme.w_bits, symmetric=scheme.w_symmetric, clip_ratio=clip)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64); the damping grows
    tenfold (with a warning) if H is still not positive definite."""
    h = hessian.to(torch.float64)
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        log.warning("GPTQ: Hessian not positive definite with damp=%g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise QuantizerError(
        "GPTQ: the layer-input Hessian is not positive definite even with heavy damping; "
        "give more (or more varied) calibration data"
    )


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme | str,
    options: GPTQOptions | None = None,
) -> torch.Tensor:
    """GPTQ-quantized copy of ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` of its input.

    Bits, symmetry, group size and ``-wmse`` come from ``scheme``. Without act-order, each group's
    scale is computed when the group starts, from the weights as updated by the error feedback so
    far (the reference implementation's behaviour); per-channel scales come from the whole row.
    Input columns that never saw a non-zero input (``diag H == 0``) are set to 0.
    """
    scheme = QuantScheme.coerce(scheme)
    opts = options or GPTQOptions()
    if scheme.w_bits >= 16:
        return weight.detach().clone()
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise QuantizerError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    clip_search = scheme.w_clip_search or opts.mse_clip
    bits, g = scheme.w_bits, scheme.w_group_size
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    channel = None
    if g is None:
        channel = _grid(W, scheme, opts, clip_search)
    elif opts.act_order:
        static = [_grid(W[:, s : s + g], scheme, opts, clip_search) for s in range(0, cols, g)]

    perm = torch.arange(cols)
    if opts.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, opts.damp).to(torch.float32)

    Q = torch.zeros_like(W)
    current = channel
    for i1 in range(0, cols, opts.block_size):
        i2 = min(i1 + opts.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if static is not None:
                current = static[col // g]
            elif g is not None and col % g == 0:
                # Group starts: its scale from the current (error-updated) weights of its columns.
                rest = max(0, g - (i2 - i1 - i))
                current = _grid(torch.cat([W1[:, i : i + g], W[:, i2 : i2 + rest]], dim=1), scheme, opts, clip_search)
            w = W1[:, i]
            q = quantize_to_grid(w.unsqueeze(1), current[0], current[1], bits).squeeze(1)
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if opts.act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(weight.dtype)


# ---------------------------------------------------------------------- sequential calibration
class _Hessian:
    """Running ``sum x x^T`` over tokens (float64) and the token count."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask]
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum += (x.T @ x).to(torch.float64)
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


class _LayerHooks:
    """Forward pre-hooks on one decoder layer's target linears: apply the online input transform
    of plain ``nn.Linear`` targets (so the layer computes what the quantized model will), and, while
    ``collect`` is on, accumulate each distinct input's Hessian. Linears whose input is the same
    tensor (with the same transform) share one Hessian."""

    def __init__(self, targets: list[tuple[str, nn.Module]], transforms: Mapping[str, nn.Module]) -> None:
        self.collect = True
        self.mask: torch.Tensor | None = None
        self.hessians: list[_Hessian] = []
        self.group_of: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, nn.Module | None, int]] = []
        self._done: set[int] = set()
        self._handles = [m.register_forward_pre_hook(self._hook(n, m, transforms.get(n))) for n, m in targets]

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask, self._seen, self._done = mask, [], set()

    def _hook(self, name: str, module: nn.Module, transform: nn.Module | None):
        own = isinstance(module, QuantLinear)
        if own:
            transform = module.input_transform

        def hook(_module, args):
            x = args[0]
            xt = transform(x) if transform is not None else x
            if self.collect:
                key = self.group_of.get(name)
                if key is None:
                    key = next((k for ref, t, k in self._seen if ref is x and t is transform), None)
                    if key is None:
                        key = len(self.hessians)
                        self.hessians.append(_Hessian(x.shape[-1], x.device))
                    self.group_of[name] = key
                self._seen.append((x, transform, key))  # keeps x alive: ids cannot be reused
                if key not in self._done:
                    self._done.add(key)
                    self.hessians[key].add(xt.detach(), self.mask)
            if transform is not None and not own:
                return (xt, *args[1:])
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen = []


@torch.no_grad()
def _gptq_pass(
    model: nn.Module,
    scheme: QuantScheme,
    targets: dict[str, nn.Module],
    batches: Sequence[Any],
    options: GPTQOptions,
    transforms: Mapping[str, nn.Module],
    progress: Callable[[str, int, int], None] | None,
    stats: dict,
) -> set[str]:
    """GPTQ weights of every target inside the decoder stack, layer by layer (see module doc),
    written into the targets' weights in place; returns the names of the targets it quantized."""
    from tqdm.auto import tqdm

    pipeline = BlockPipeline(model, batches)
    done: set[str] = set()
    tokens = 0
    bar = tqdm(total=len(pipeline), desc="gptq", unit="layer", leave=False)
    try:
        for block in pipeline:
            prefix = block.name + "."
            inside = [(n, m) for n, m in targets.items() if n.startswith(prefix)]
            hooks = _LayerHooks(inside, transforms)
            try:
                for h, kw, mask in zip(block.inputs, block.kwargs, block.masks):
                    hooks.new_batch(None if mask is None else mask.bool().to(h.device))
                    run_layer(block.layer, h, kw)
                groups: dict[int, list[str]] = {}
                for n, _ in inside:
                    if n in hooks.group_of:
                        groups.setdefault(hooks.group_of[n], []).append(n)
                    else:
                        log.warning("GPTQ: %s never ran on the calibration data; it gets RTN weights", n)
                for key, members in groups.items():
                    hess = hooks.hessians[key]
                    tokens = max(tokens, hess.count)
                    stacked = torch.cat([targets[n].weight.detach() for n in members], dim=0)
                    q = gptq_quantize(stacked, hess.value(), scheme, options)
                    del stacked
                    # Written in place at once: no second copy of every weight until the end.
                    with torch.no_grad():
                        for n, part in zip(members, q.split([targets[n].weight.shape[0] for n in members], dim=0)):
                            targets[n].weight.copy_(part.to(targets[n].weight.dtype))
                            done.add(n)
                    del q
                hooks.hessians = []
                # This layer's outputs with its quantized weights (transform hooks still on) feed the next.
                hooks.collect = False
                block.outputs = block.run(block.inputs)
            finally:
                hooks.remove()
            bar.update(1)
            if progress is not None:
                progress("gptq", block.index + 1, len(pipeline))
    finally:
        bar.close()
    stats.update({"layers": len(pipeline), "gptq_linears": len(done), "calibration_tokens": tokens})
    return done


# ---------------------------------------------------------------------- the shared weight step
def _targets(model: nn.Module, scheme: QuantScheme) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear)) and not scheme.skips(n)
    }


def quantize_weights(
    model: nn.Module,
    scheme: QuantScheme | str,
    *,
    method: Literal["rtn", "gptq"],
    batches: Sequence[Any] | None = None,
    options: RTNOptions | None = None,
    input_transforms: Mapping[str, nn.Module] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    stats: dict | None = None,
) -> list[str]:
    """Quantize every non-skipped Linear of ``model`` in place with RTN or GPTQ weights and the
    scheme's activation settings; returns the quantized module names. See the module docstring
    for the contract (already-``QuantLinear`` models, transforms, sequential GPTQ). ``options``:
    :class:`GPTQOptions` (or :class:`RTNOptions` for ``rtn``); ``stats``, if given, is filled with
    what the step did (method, seconds, layers, calibration tokens)."""
    scheme = QuantScheme.coerce(scheme)
    if method not in ("rtn", "gptq"):
        raise QuantizerError(f"weight method {method!r} is unknown; use 'rtn' or 'gptq'")
    if method == "gptq" and not batches:
        raise QuantizerError(
            "GPTQ weights need calibration batches; pass batches= (the context's calibration data) "
            "or use method='rtn'"
        )
    opts = options if options is not None else (GPTQOptions() if method == "gptq" else RTNOptions())
    if method == "gptq" and not isinstance(opts, GPTQOptions):
        raise QuantizerError(f"GPTQ weights need GPTQOptions, got {type(opts).__name__}")
    stats = stats if stats is not None else {}
    stats.update({"method": method})
    if not scheme.quantizes_linears:
        return []
    transforms = dict(input_transforms or {})
    targets = _targets(model, scheme)
    wrapped = {n for n, m in targets.items() if isinstance(m, QuantLinear)}
    if wrapped:
        _check_wrapped(model, targets, wrapped, transforms)
    started = time.perf_counter()
    rtn = RTNQuantizer(opts)
    gptq_done: set[str] = set()
    if method == "gptq" and scheme.quantizes_weights:
        saved = {n: targets[n].a_bits for n in wrapped}
        try:
            for n in wrapped:  # FP activations during calibration
                targets[n].a_bits = 16
            gptq_done = _gptq_pass(model, scheme, targets, batches, opts, transforms, progress, stats)
        finally:
            for n, bits in saved.items():
                targets[n].a_bits = bits

    def weight_fn(name: str, linear: nn.Module, scheme: QuantScheme) -> torch.Tensor:
        if name in gptq_done:
            return linear.weight.detach()  # already GPTQ-rounded in place
        if method == "gptq" and scheme.quantizes_weights:
            log.info("GPTQ: %s is outside the decoder layers; RTN weights", name)
        return rtn.weight(name, linear, scheme)

    if wrapped:
        done = _requantize_wrapped(targets, scheme, weight_fn, transforms, progress)
    else:
        del targets  # let quantize_linear_layers release each replaced Linear
        done = quantize_linear_layers(model, scheme, weight_fn, input_transforms=transforms, progress=progress)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return done


def _check_wrapped(
    model: nn.Module, targets: Mapping[str, nn.Module], wrapped: set[str], transforms: Mapping[str, nn.Module]
) -> None:
    plain = sorted(set(targets) - wrapped)
    if plain:
        raise QuantizerError(
            f"model mixes QuantLinear and plain nn.Linear layers (e.g. {plain[0]}); wrap all or none "
            "before the weight step"
        )
    done = [n for n in wrapped if targets[n].w_bits < 16]
    if done:
        raise QuantizerError(f"{done[0]} already has quantized weights; quantize a fresh full-precision copy")
    for n, t in transforms.items():
        current = targets[n].input_transform if n in targets else None
        if current is not None and current is not t:
            raise QuantizerError(f"{n} already has an input_transform; do not pass another for it")
    unused = sorted(n for n in transforms if n not in targets)
    if unused:
        log.warning("input_transforms for modules that are not quantized: %s", ", ".join(unused))


def _requantize_wrapped(targets, scheme, weight_fn, transforms, progress) -> list[str]:
    """Weight step for models whose targets are already (weight-FP) QuantLinears: in place."""
    names = list(targets)
    for i, n in enumerate(names):
        module: QuantLinear = targets[n]
        with torch.no_grad():
            module.weight.copy_(weight_fn(n, module, scheme).to(module.weight.dtype))
        module.w_bits, module.a_bits = scheme.w_bits, scheme.a_bits
        module.a_symmetric, module.a_clip_ratio = scheme.a_symmetric, scheme.a_clip_ratio
        if n in transforms and module.input_transform is None:
            module.input_transform = transforms[n]
        if progress is not None:
            progress("quantize linear layers", i + 1, len(names))
    log.info("quantized %d QuantLinear weights in place (%s)", len(names), scheme.label)
    return names


# ---------------------------------------------------------------------- the quantizer
@register_quantizer
class GPTQQuantizer(Quantizer):
    """GPTQ weights (sequential, Hessian error feedback) plus the scheme's activations and KV cache."""

    name = "gptq"
    description = "GPTQ weights (second-order error feedback, sequential), per-token activations, KV cache"
    Options = GPTQOptions
    requires_calibration = True

    def check(self, scheme: QuantScheme) -> None:
        if not scheme.quantizes_weights:
            raise QuantizerError(
                f"gptq quantizes weights; scheme {scheme.label!r} keeps them in full precision (use rtn)"
            )

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        if scheme.quantizes_kv:
            enable_kv_quant(model, scheme)  # fail on an unsupported architecture before any work
        stats: dict = {}
        quantize_weights(
            model, scheme, method="gptq", batches=ctx.calibration_batches, options=self.options,
            progress=ctx.progress, stats=stats,
        )
        self.metadata["weights"] = stats
        return model
