"""Shared calibration machinery: one optimisation loop with a pluggable loss, plus the activation
statistics and block-input capture that calibration-based quantizers need.

Every learned method (``ost``, ``aaq``, ``qrealign``) trains its parameters with
:func:`run_calibration`; they differ only in what they learn and in the ``loss_fn`` they pass.
AAQ is therefore "the transform method plus a loss", and Q-realign's block-wise objective runs
in the same loop as OST's end-to-end one. The loop:

* steps an AdamW optimiser over parameter groups (each with its own learning rate), optionally
  with a cosine schedule and gradient-norm clipping;
* logs every named loss term every step (e.g. AAQ's ``pull`` and ``push``) and shows them on
  the progress bar, and keeps the whole history for the variant's metadata;
* stops with a one-line :class:`QuantizerError` on a NaN/inf loss, and applies a
  :class:`DivergenceGuard` to a watched term (AAQ's push term is maximised and unbounded above):
  when the term grows past ``factor`` times its first value, the loop either stops early and
  restores the parameters of the last good step (``action="stop"``) or raises.

Block-wise methods (GPTQ, Q-realign) use :func:`capture_layer_inputs` to get the input of the first
decoder layer with the keyword arguments the model passes to every layer (rotary position
embeddings, causal mask), then run layers one by one with :func:`run_layer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .errors import QuantizerError

__all__ = [
    "LossFn",
    "DivergenceGuard",
    "CalibrationLog",
    "run_calibration",
    "model_inputs",
    "decoder_layers",
    "LayerInputs",
    "capture_layer_inputs",
    "run_layer",
    "input_channel_absmax",
    "peak_memory_bytes",
]

#: ``loss_fn(batch, step) -> (loss, terms)``: the scalar to minimise and named floats to log.
LossFn = Callable[[Any, int], tuple[torch.Tensor, Mapping[str, float]]]


@dataclass(frozen=True)
class DivergenceGuard:
    """Watch one logged term; act when ``|term|`` exceeds ``factor * max(|first value|, floor)``.

    ``action="stop"`` ends calibration early and restores the parameters of the last step whose
    term was within bounds; ``"error"`` raises :class:`QuantizerError` (no artifact is written).
    """

    term: str
    factor: float = 10.0
    floor: float = 1e-3
    action: Literal["stop", "error"] = "stop"

    def __post_init__(self) -> None:
        if self.factor <= 1.0:
            raise QuantizerError(f"divergence guard factor must be > 1, got {self.factor}")
        if self.action not in ("stop", "error"):
            raise QuantizerError(f"divergence guard action must be 'stop' or 'error', got {self.action!r}")


@dataclass
class CalibrationLog:
    """What one calibration run did: per-step loss terms, early stop reason, time and memory."""

    stage: str
    steps_planned: int
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_run: int = 0
    stopped_early: str | None = None
    seconds: float = 0.0
    peak_memory_bytes: int = 0

    def record(self, terms: Mapping[str, float]) -> None:
        for key, value in terms.items():
            self.history.setdefault(key, []).append(float(value))

    def last(self, term: str = "loss") -> float | None:
        values = self.history.get(term)
        return values[-1] if values else None

    def to_dict(self, max_points: int = 200) -> dict[str, Any]:
        """A JSON-ready summary; long curves are subsampled to ``max_points`` evenly spaced steps."""
        curves = {}
        for key, values in self.history.items():
            if len(values) > max_points:
                idx = [round(i * (len(values) - 1) / (max_points - 1)) for i in range(max_points)]
                values = [values[i] for i in idx]
            curves[key] = [round(v, 6) for v in values]
        return {
            "stage": self.stage,
            "steps_planned": self.steps_planned,
            "steps_run": self.steps_run,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "curves": curves,
        }


def _param_groups(params: Iterable[nn.Parameter] | Sequence[Mapping[str, Any]], lr: float) -> list[dict]:
    params = list(params)
    if not params:
        raise QuantizerError("calibration has no trainable parameters")
    if isinstance(params[0], Mapping):
        groups = [dict(g) for g in params]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "lr": lr}]
    if not groups or not any(g["params"] for g in groups):
        raise QuantizerError("calibration has no trainable parameters")
    return groups


def _snapshot(groups: list[dict]) -> list[torch.Tensor]:
    return [p.detach().clone() for g in groups for p in g["params"]]


def _restore(groups: list[dict], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip((p for g in groups for p in g["params"]), saved):
            p.copy_(s)


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the process's peak RSS.

    On Linux the peak RSS is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this
    program's own address space: ``ru_maxrss`` survives ``exec`` and so reports the parent's RSS
    at the fork when that was larger (a quantize run started by a bench that holds a model read
    4.6 GiB for a 2.0 GiB run)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def learning_rate_schedule(optimizer: torch.optim.Optimizer, schedule: str, steps: int,
                           warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The factor on every group's learning rate per step: a linear warm-up over ``warmup_steps``
    (a rotation trained at its full rate from a random Hadamard start can overshoot on the first
    steps), then ``constant`` or ``cosine`` decay to 0. None when the rate never changes."""
    if schedule not in ("constant", "cosine"):
        raise QuantizerError(f"unknown learning-rate schedule {schedule!r}; use 'constant' or 'cosine'")
    if not 0 <= warmup_steps < steps:
        raise QuantizerError(f"warm-up steps ({warmup_steps}) must be >= 0 and below the steps ({steps})")
    if schedule == "constant" and warmup_steps == 0:
        return None

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        done = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_calibration(
    loss_fn: LossFn,
    params: Iterable[nn.Parameter] | Sequence[Mapping[str, Any]],
    batches: Sequence[Any],
    steps: int,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: Literal["constant", "cosine"] = "constant",
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    guard: DivergenceGuard | Sequence[DivergenceGuard] | None = None,
    stage: str = "calibrate",
    progress: Callable[[str, int, int], None] | None = None,
    show_progress: bool = True,
    device: torch.device | str | None = None,
    loss_fn_backpropagates: bool = False,
) -> CalibrationLog:
    """Minimise ``loss_fn`` over ``steps`` steps, cycling through ``batches``.

    ``params`` is an iterable of parameters (one learning rate ``lr``) or a list of AdamW
    parameter groups (dicts with ``params`` and their own ``lr``/``weight_decay``). The returned
    :class:`CalibrationLog` holds every logged term per step (``loss`` is always logged).
    ``guard`` is one :class:`DivergenceGuard` or several (each watching its own term; the first to
    trip decides). ``schedule``: the learning rate after ``warmup_steps`` steps of linear warm-up
    (step ``i`` of the warm-up runs at ``(i + 1) / (warmup_steps + 1)`` of it): ``constant``, or
    ``cosine`` decay to 0 over the remaining steps. ``loss_fn_backpropagates``: ``loss_fn`` has already filled the gradients
    (gradient accumulation over micro-batches) and its loss is only logged and guarded. Raises
    :class:`QuantizerError` on a non-finite loss or, with ``action == "error"``, on divergence.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise QuantizerError(f"calibration steps must be >= 1, got {steps}")
    if not batches:
        raise QuantizerError("calibration needs at least one batch; give calibration data")
    groups = _param_groups(params, lr)
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = learning_rate_schedule(optimizer, schedule, steps, warmup_steps)
    log = CalibrationLog(stage=stage, steps_planned=steps)
    guards = [] if guard is None else [guard] if isinstance(guard, DivergenceGuard) else list(guard)
    watched_start: dict[str, float] = {}
    good_state = _snapshot(groups) if any(g.action == "stop" for g in guards) else None
    bar = tqdm(total=steps, desc=stage, unit="step", disable=not show_progress, leave=False)
    started = time.perf_counter()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            loss, terms = loss_fn(batch, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise QuantizerError(
                    f"{stage}: the loss became {value} at step {step + 1}; lower the learning rate "
                    "or check the calibration data"
                )
            terms = {"loss": value, **{k: float(v) for k, v in terms.items()}}
            reason, tripped = _divergence(guards, terms, watched_start, step)
            if tripped is not None:
                if tripped.action == "error":
                    raise QuantizerError(f"{stage}: {reason}; lower alpha or the learning rate")
                log.stopped_early = reason
                if good_state is not None:
                    _restore(groups, good_state)
                break
            if good_state is not None:
                good_state = _snapshot(groups)  # these parameters gave an in-bounds term
            if not loss_fn_backpropagates:
                loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            log.record(terms)
            log.steps_run = step + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            if progress is not None:
                progress(stage, step + 1, steps)
    finally:
        bar.close()
    log.seconds = time.perf_counter() - started
    log.peak_memory_bytes = peak_memory_bytes(device)
    return log


def _divergence(guards: Sequence[DivergenceGuard], terms: Mapping[str, float], start: dict[str, float],
                step: int) -> tuple[str, DivergenceGuard | None]:
    """The first guard whose term left its bounds this step (``start`` keeps each term's first value)."""
    for g in guards:
        if g.term not in terms:
            continue
        watched = abs(terms[g.term])
        if g.term not in start:
            start[g.term] = max(watched, g.floor)
        elif not math.isfinite(watched) or watched > g.factor * start[g.term]:
            return (f"{g.term} term diverged at step {step + 1}: |{g.term}| = {watched:.4g} > "
                    f"{g.factor:g} x its first value {start[g.term]:.4g}"), g
    return "", None


# ---------------------------------------------------------------------- batches and layers
def model_inputs(batch: Any, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A calibration batch (a LongTensor of ids or a dict of model inputs) as model kwargs on ``device``."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise QuantizerError(f"calibration batch must be a tensor of token ids or a dict of inputs, got {type(batch).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM, found by :mod:`common.layout`; raises
    :class:`QuantizerError` when the model has none this project knows."""
    from common.layout import LAYOUTS
    from common.layout import decoder_layers as find_layers

    layers = find_layers(model)
    if layers is None:
        raise QuantizerError(
            f"{type(model).__name__} has no decoder-layer list this project knows; the architectures with "
            f"a layout are {', '.join(LAYOUTS)} (add one to common.layout.LAYOUTS)"
        )
    return layers


class _StopForward(Exception):
    """Raised by a hook to stop the model's forward once the wanted input is captured."""


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for every calibration batch: hidden states plus the keyword
    arguments (rotary embeddings, causal mask, position ids) the model passes to each layer."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Sequence[Any], layer_index: int = 0) -> LayerInputs:
    """Run ``model`` on every batch up to decoder layer ``layer_index`` and keep that layer's inputs.

    The forward stops at the layer (later layers do not run). The cache is switched off in the
    captured kwargs so that layers can be re-run independently.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["past_key_values"] = None
        kw["use_cache"] = False
        hidden.append(h.detach())
        kwargs_list.append(kw)
        raise _StopForward

    handle = layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**model_inputs(batch, device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs_list)


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """One decoder layer's output hidden states (older transformers return a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def input_channel_absmax(
    model: nn.Module,
    batches: Sequence[Any],
    select: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of every selected ``nn.Linear`` input over the calibration
    batches (SmoothQuant's activation statistic; token positions masked out by ``attention_mask``
    are ignored). ``select(name, module)`` picks the layers (default: every ``nn.Linear``)."""
    device = next(model.parameters()).device
    select = select or (lambda _name, module: isinstance(module, nn.Linear))
    stats: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).abs().float()
            if x.numel() == 0:
                return
            m = x.amax(dim=0)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in model.named_modules() if select(n, m)]
    try:
        for batch in batches:
            inputs = model_inputs(batch, device)
            current_mask[0] = inputs.get("attention_mask")
            model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats
