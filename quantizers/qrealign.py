"""Q-realign: post-training quantization that restores the safety a fine-tune eroded.

Tan et al., "Q-realign: Piggybacking Realignment on Quantization for Safe and Efficient LLM
Deployment" (arXiv 2601.08089); recipe in ``../shared/methods/QREALIGN.md``. The calibration is
block-wise, as in OmniQuant (Shao et al., ICLR 2024, "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models"): decoder blocks are calibrated one after the other, each
on the input ``X_fp`` it gets in the full-precision model and the input ``X_q`` it gets from the
already-quantized blocks before it. Learned per block, everything else frozen:

* learnable weight clipping (LWC): per output channel (per group with ``g<N>``) upper and lower
  factors ``sigmoid(theta)`` of the weight range, initialised at ``clip_init`` (0.98);
* learnable equivalent smoothing scales (SmoothQuant's migration, Xiao et al., ICML 2023),
  initialised from per-channel activation maxima (``alpha = 0.5``) on the sites
  input norm -> q/k/v, post-attention norm -> gate/up, v -> o, and q <-> k. The q <-> k scale is
  tied across the two halves of each head so that it commutes with RoPE (an exact fold); it only
  changes anything when keys are quantized (a ``kv<b>`` scheme), since per-row weight scales are
  invisible to per-output-channel weight quantization, so it is learned only then. The sites,
  their folding and their SmoothQuant initialisation are the shared ones of
  :mod:`quantizers.transforms` and :mod:`quantizers.smoothquant`.

The objective of block ``i`` (``t`` = the last prompt token, ``(w_i, b_i)`` the SLR probe of layer
``i``, fitted on the aligned model):

* benign sample: ``MSE(F_i(X_fp), Q_i(X_q))`` over every token and channel;
* malicious sample: ``softplus(-(Q_i(X_q)[t] . w_i + b_i))``: push the quantized hidden state to
  the malicious side of the probe, so that later layers recognise the request as harmful.

There is no weight between the two terms: the balance is the calibration mix (75% malicious by
default). After a block is calibrated its scales are folded into the norms and weights, its
weights are fake-quantized in place with the learned clipping, and ``X_q`` is propagated.

Deviations from the released code (its pitfalls, QREALIGN.md): calibration and evaluation prompts
are kept disjoint and listed in the variant's metadata (:func:`calibration_overlap` finds
overlaps); calibration prompts use the same chat template (and ``system_prompt``) as evaluation;
sequences are not padded (the last prompt token is the last position; batches are left padded);
the activation maxima for the smoothing initialisation are computed. Training runs through the
shared :func:`~quantizers.calibration.run_calibration` loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.batching import left_pad, pad_token_id
from common.layout import LLAMA, layout_of
from common.prompts import PromptFootprint, chat_prompt, normalise_prompt, prompt_hash

from .base import QuantContext, Quantizer, QuantizerError, register_quantizer
from .calibration import (
    CalibrationLog,
    decoder_layers,
    input_channel_absmax,
    peak_memory_bytes,
    run_calibration,
    run_layer,
)
from .fake_quant import RangeStats, fake_quant_activation, fake_quant_weight, range_stats
from .modules import default_weight_fn, enable_kv_quant, quantize_linear_layers
from .pipeline import Block, BlockPipeline
from .scheme import QuantScheme

__all__ = [
    "QRealignOptions",
    "QRealignQuantizer",
    "QRealignBlock",
    "qrealign_loss",
    "normalise_prompt",
    "prompt_hash",
    "select_calibration",
    "calibration_overlap",
    "resolve_probe_file",
    "probe_directions",
    "fit_probes",
    "diagnostic_records",
]

log = logging.getLogger(__name__)

#: Logit used for a clip factor of exactly 1: ``sigmoid(20.0) == 1.0`` in float32.
_CLIP_ONE_LOGIT = 20.0
_SCALE_MIN = 1e-5


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class QRealignOptions:
    """Q-realign options; defaults are the paper's (QREALIGN.md).

    ``n_prompts``: calibration samples (200); ``malicious_fraction``: share of them that are
    harmful (0.75; must leave at least one of each kind); ``seq_len``: at most this many tokens of
    each chat-formatted prompt, the end kept (128); ``epochs_shallow`` / ``epochs_deep``: epochs
    for the first half of the blocks / the rest (5 / 15); ``batch_size``: samples per step (1, the
    paper's; larger batches take ``epochs * n_prompts / batch_size`` steps, fewer but costlier);
    ``lr_smooth`` / ``lr_clip``: AdamW learning rates of the smoothing scales / clipping factors
    (1e-3 / 1e-2); ``clip_init``: initial clipping factor (0.98; 1.0 starts exactly at RTN);
    ``smooth``: learn smoothing scales (True); ``smooth_alpha``: SmoothQuant migration strength
    of their initialisation (0.5); ``asym_weights``: per-channel asymmetric weights as in the paper
    even when the scheme string lacks ``-wasym`` (True; False follows the scheme);
    ``probes_from``: ``"reference"`` fits SLR probes on ``ctx.probe_model`` (else the FP subject)
    using every calibration record, or a path to probes written by ``safequant probe`` /
    ``probes.save_probes``; ``probe_C`` / ``probe_max_iter`` / ``probe_test_size``: the probe fit
    (L1, saga, 1.0 / 500 / 0.2 as in the paper); ``probe_standardize``: fit on z-scored features
    (True, the project's probe default; the direction is mapped back to raw hidden states either
    way; False is the paper's raw fit, on which saga often stops unconverged);
    ``system_prompt``: system prompt of the calibration chat template (empty = none); use the one
    the model is evaluated and deployed with; ``probe_margin``: the malicious loss is
    ``softplus(margin - logit)`` (0, the paper's); a positive margin keeps pushing prompts that
    are already on the malicious side (an ablation, not the paper's method);
    ``diagnostic_prompts``: at most this many harmful and as many benign records, held out of the
    calibration steps (and of the probe fit when the probes are fitted here), on which the
    per-layer diagnostics of :mod:`probes.realign` are measured for the aligned, the FP and the
    quantized model (32; 0 = none), recorded in ``metadata["diagnostics"]``;
    ``loss``: the malicious rows' terms, ``paper`` (the probe loss above) or ``+``-joined terms of
    :data:`~quantizers.realign_losses.LOSS_TERMS` (``probe``, ``parent_probe``, ``direction``,
    ``output``; see :mod:`quantizers.realign_losses`); ``output_blocks`` / ``output_weight``: the
    ``output`` term acts on the last this many blocks (1) with this weight (1.0);
    ``probe_blocks``: the blocks (0-based, as ``--probe-layers``: ``all``, ``N``, ``A-B``, ``-N``
    from the end) at which the representation terms (``probe``, ``parent_probe``, ``direction``)
    act; at the other blocks a malicious row keeps the MSE of its output at the last prompt token
    (``all``, the paper's; the paper's observation is that the classes separate in the middle and
    deep layers, so ``15-29`` asks whether the deep half alone does the work).
    """

    n_prompts: int = 200
    malicious_fraction: float = 0.75
    seq_len: int = 128
    epochs_shallow: int = 5
    epochs_deep: int = 15
    batch_size: int = 1
    lr_smooth: float = 1e-3
    lr_clip: float = 1e-2
    clip_init: float = 0.98
    smooth: bool = True
    smooth_alpha: float = 0.5
    asym_weights: bool = True
    probes_from: str = "reference"
    probe_C: float = 1.0
    probe_max_iter: int = 500
    probe_test_size: float = 0.2
    probe_standardize: bool = True
    system_prompt: str = ""
    probe_margin: float = 0.0
    diagnostic_prompts: int = 32
    loss: str = "paper"
    output_blocks: int = 1
    output_weight: float = 1.0
    probe_blocks: str = "all"

    def __post_init__(self) -> None:
        def bad(message: str) -> QuantizerError:
            return QuantizerError(f"qrealign option {message}")

        if self.n_prompts < 2:
            raise bad(f"n_prompts={self.n_prompts} must be >= 2 (at least one malicious and one benign sample)")
        if not 0.0 < self.malicious_fraction < 1.0:
            raise bad(
                f"malicious_fraction={self.malicious_fraction} must be strictly between 0 and 1: the objective "
                "needs malicious (probe loss) and benign (MSE) samples; the paper uses 0.75"
            )
        n_mal = round(self.n_prompts * self.malicious_fraction)
        if n_mal < 1 or n_mal >= self.n_prompts:
            raise bad(
                f"malicious_fraction={self.malicious_fraction} of n_prompts={self.n_prompts} leaves no "
                f"{'malicious' if n_mal < 1 else 'benign'} sample; raise n_prompts or change the fraction"
            )
        from .realign_losses import parse_loss

        parse_loss(self.loss)
        for name in ("seq_len", "batch_size", "probe_max_iter", "output_blocks"):
            if getattr(self, name) < 1:
                raise bad(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("epochs_shallow", "epochs_deep", "diagnostic_prompts"):
            if getattr(self, name) < 0:
                raise bad(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lr_smooth", "lr_clip", "probe_C", "output_weight"):
            if not getattr(self, name) > 0:
                raise bad(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 < self.clip_init <= 1.0:
            raise bad(f"clip_init={self.clip_init} must be in (0, 1]")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise bad(f"smooth_alpha={self.smooth_alpha} must be in [0, 1]")
        if not 0.0 < self.probe_test_size < 1.0:
            raise bad(f"probe_test_size={self.probe_test_size} must be in (0, 1)")
        from probes.capture import check_layer_spec
        from probes.errors import ProbeError

        try:
            check_layer_spec(str(self.probe_blocks))
        except ProbeError as exc:
            raise bad(f"probe_blocks={self.probe_blocks!r}: {exc}") from None
        if not str(self.probes_from).strip():
            raise bad("probes_from is empty; use 'reference' or a path to saved probes")

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """The malicious rows' terms named by ``loss`` (``("probe",)`` for the paper's)."""
        from .realign_losses import parse_loss

        return parse_loss(self.loss)

    @property
    def n_malicious(self) -> int:
        return round(self.n_prompts * self.malicious_fraction)

    def epochs_for(self, block: int, n_blocks: int) -> int:
        """Shallow epochs for the first half of the blocks, deep epochs for the rest."""
        return self.epochs_shallow if block < n_blocks // 2 else self.epochs_deep


# ---------------------------------------------------------------------------------------------
# data hygiene


def _field(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)


def _check_records(records: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if not records:
        raise QuantizerError(
            "qrealign needs labelled calibration prompts (ctx.calibration_prompts: id, prompt, label, source); "
            "give harmful and benign calibration prompt sets disjoint from the evaluation sets"
        )
    out = []
    for i, r in enumerate(records):
        rid, prompt, label = _field(r, "id"), _field(r, "prompt"), _field(r, "label")
        if not isinstance(prompt, str) or not prompt.strip():
            raise QuantizerError(f"calibration prompt {i} (id {rid!r}) has no prompt text; fix the calibration set")
        if label not in ("harmful", "benign"):
            raise QuantizerError(
                f"calibration prompt {rid!r} has label {label!r}; calibration labels must be 'harmful' or 'benign'"
            )
        out.append({"id": str(rid if rid is not None else f"cal-{i}"), "prompt": prompt, "label": label,
                    "source": str(_field(r, "source") or "unknown")})
    return out


def select_calibration(
    records: Sequence[Mapping[str, Any]], n_prompts: int, malicious_fraction: float, seed: int = 0
) -> list[dict[str, Any]]:
    """The calibration mix: ``round(n_prompts * malicious_fraction)`` harmful records and the rest
    benign, drawn with ``seed`` and shuffled together. Raises :class:`QuantizerError` when either
    kind is missing or too few."""
    recs = _check_records(records)
    harmful = [r for r in recs if r["label"] == "harmful"]
    benign = [r for r in recs if r["label"] == "benign"]
    n_mal = round(n_prompts * malicious_fraction)
    n_ben = n_prompts - n_mal
    for kind, have, need in (("malicious (harmful)", harmful, n_mal), ("benign", benign, n_ben)):
        if not have:
            raise QuantizerError(
                f"the qrealign calibration set has no {kind} prompts; the objective needs both kinds: add them"
            )
        if len(have) < need:
            raise QuantizerError(
                f"qrealign needs {need} {kind} calibration prompts (n_prompts={n_prompts}, "
                f"malicious_fraction={malicious_fraction}) but got {len(have)}; add prompts or lower n_prompts"
            )
    rng = random.Random(seed)
    chosen = rng.sample(harmful, n_mal) + rng.sample(benign, n_ben)
    rng.shuffle(chosen)
    return chosen


def _calibration_metadata(chosen: Sequence[Mapping[str, Any]], probe_records: Sequence[Mapping[str, Any]]) -> dict:
    sources = sorted({r["source"] for r in chosen} | {r["source"] for r in probe_records})
    chosen_ids = [r["id"] for r in chosen]
    extra = [r for r in probe_records if r["id"] not in set(chosen_ids)]
    return {
        "source": "+".join(sources),
        "ids": chosen_ids,
        "n_harmful": sum(r["label"] == "harmful" for r in chosen),
        "n_benign": sum(r["label"] == "benign" for r in chosen),
        "probe_ids": [r["id"] for r in extra],
        "hashes": sorted({prompt_hash(r["prompt"]) for r in [*chosen, *extra]}),
    }


def calibration_overlap(calibration_meta: Mapping[str, Any] | None, prompt_records: Iterable[Any]) -> list[str]:
    """Ids of ``prompt_records`` (dicts or objects with ``id``/``prompt``, optional ``source``) that
    were used to calibrate the variant (or to fit its probes): same normalised prompt text, or the
    same id from the same source (a record without a source matches any). ``calibration_meta`` is
    the ``metadata["calibration_prompts"]`` a Q-realign variant records. The rule is
    :class:`common.prompts.PromptFootprint`'s, the one the harness checks before calibrating."""
    if not calibration_meta:
        return []
    return PromptFootprint.from_metadata(calibration_meta).overlap(prompt_records)


def diagnostic_records(records: Sequence[Mapping[str, Any]], chosen: Sequence[Mapping[str, Any]],
                       probe_records: Sequence[Mapping[str, Any]], opts: QRealignOptions,
                       seed: int) -> list[dict[str, Any]]:
    """Up to ``opts.diagnostic_prompts`` harmful and as many benign records that no calibration step
    saw and, when the probes were fitted on ``probe_records``, that sat in the probe fit's held-out
    split (the split :func:`fit_probes` draws with ``seed``), in record order."""
    if opts.diagnostic_prompts == 0:
        return []
    used = {r["id"] for r in chosen}
    pool = [r for r in records if r["id"] not in used]
    if probe_records:
        import numpy as np

        from probes.slr import stratified_split

        labels = np.asarray([r["label"] == "harmful" for r in probe_records], dtype=np.int64)
        test = {probe_records[i]["id"] for i in stratified_split(labels, opts.probe_test_size, seed)[1]}
        pool = [r for r in pool if r["id"] in test]
    harmful = [r for r in pool if r["label"] == "harmful"][:opts.diagnostic_prompts]
    benign = [r for r in pool if r["label"] == "benign"][:opts.diagnostic_prompts]
    return harmful + benign if harmful and benign else []


def _diagnoser(ctx: QuantContext, records: Sequence[Mapping[str, Any]], directions: Mapping[int, tuple],
               opts: QRealignOptions) -> Callable[[nn.Module | None], dict[str, Any] | None] | None:
    """``diagnose(model)``: :func:`probes.realign.model_diagnostics` of a model on ``records``
    (None for no model); None when there are no diagnostic records."""
    if not records:
        return None
    from probes.realign import model_diagnostics

    texts = [chat_prompt(ctx.tokenizer, r["prompt"], opts.system_prompt) for r in records]
    labels = [int(r["label"] == "harmful") for r in records]
    dirs = {layer: (w.numpy(), b) for layer, (w, b) in directions.items()}

    def diagnose(model: nn.Module | None) -> dict[str, Any] | None:
        if model is None:
            return None
        return model_diagnostics(model, ctx.tokenizer, texts, labels, dirs, ctx.refusal_token_ids,
                                 max_tokens=opts.seq_len)
    return diagnose


def _diagnostics_metadata(before: Mapping[str, Any], quantized: Mapping[str, Any],
                          records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``metadata["diagnostics"]``: per model (aligned parent, FP subject, quantized) and layer the
    aligned probes' logit distribution and the logit-lens refusal probability, and where the
    subject's refusal decision departs from the aligned one (before and after quantization)."""
    from probes.realign import divergence

    models = {"aligned": before["aligned"], "fp": before["fp"], "quantized": quantized}
    doc: dict[str, Any] = {"prompt_ids": [r["id"] for r in records],
                           "models": {k: v for k, v in models.items() if v is not None}}
    if before["aligned"] is not None:
        doc["divergence"] = {"fp": divergence(before["aligned"], before["fp"]),
                             "quantized": divergence(before["aligned"], quantized)}
    return doc


# ---------------------------------------------------------------------------------------------
# probes


def resolve_probe_file(path: str | Path) -> Path:
    """The probe file behind ``probes_from``: a ``.safetensors``/``.json`` file or stem, or a folder
    written by ``safequant probe`` (its ``probes_fp`` file, else its only probe file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        preferred = p / "probes_fp.safetensors"
        if preferred.is_file():
            return preferred
        found = sorted(f for f in p.glob("*.safetensors") if f.with_suffix(".json").is_file())
        if len(found) == 1:
            return found[0]
        what = "no probe files" if not found else f"{len(found)} probe files ({', '.join(f.name for f in found)})"
        raise QuantizerError(f"probes_from {str(path)!r}: the folder holds {what}; pass the probe file itself")
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    if not stem.with_suffix(".safetensors").is_file():
        raise QuantizerError(
            f"probes_from {str(path)!r}: no such probe file or folder; pass a folder written by "
            "`safequant probe` or 'reference' to fit probes on the aligned model"
        )
    return stem.with_suffix(".safetensors")


def probe_directions(
    probes: Mapping[int, Any], n_layers: int, hidden_size: int, source: str
) -> dict[int, tuple[torch.Tensor, float]]:
    """``{layer: (w, b)}`` from SLR probes (``probe.direction``), checked to cover every decoder
    layer with the model's hidden size. Raises :class:`QuantizerError` otherwise."""
    missing = [i for i in range(n_layers) if i not in probes]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise QuantizerError(
            f"probes from {source} lack layer(s) {shown} of the model's {n_layers} decoder layers; "
            "fit probes on all layers (safequant probe --layers all) of the aligned model"
        )
    extra = sorted(i for i in probes if not 0 <= int(i) < n_layers)
    if extra:
        raise QuantizerError(
            f"probes from {source} have layer(s) up to {extra[-1]} but the model has {n_layers} decoder layers: "
            "they come from a deeper model; fit the probes on the aligned model of the same family"
        )
    out = {}
    for i in range(n_layers):
        w, b = probes[i].direction
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        if w.numel() != hidden_size:
            raise QuantizerError(
                f"probes from {source} have width {w.numel()} at layer {i} but the model's hidden size is "
                f"{hidden_size}; fit the probes on a model of the same family"
            )
        out[i] = (w, float(b))
    return out


def fit_probes(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]],
                opts: QRealignOptions, seed: int) -> tuple[dict[int, Any], dict[str, Any]]:
    """One SLR probe per decoder layer, fitted on the block outputs at the last prompt token of
    ``model`` for the chat-formatted ``records`` (labels harmful/benign), on a stratified split;
    returns ``({layer: probe}, metadata with held-out accuracy and convergence per layer)``."""
    import warnings

    import numpy as np

    from probes.capture import capture
    from probes.errors import ProbeError
    from probes.slr import fit_slr, stratified_split

    texts = [chat_prompt(tokenizer, r["prompt"], opts.system_prompt) for r in records]
    labels = np.asarray([1 if r["label"] == "harmful" else 0 for r in records])
    try:
        acts = capture(model, tokenizer, texts, layers=None, position="last", max_tokens=opts.seq_len,
                       progress=False, desc="qrealign probes")
        split = stratified_split(labels, opts.probe_test_size, seed)
        probes, layers = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is recorded per layer instead
            for layer in acts.layers:
                probe, metrics = fit_slr(acts.get(layer), labels, split=split, seed=seed, C=opts.probe_C,
                                         max_iter=opts.probe_max_iter, standardize=opts.probe_standardize)
                probes[layer] = probe
                layers[layer] = {k: metrics[k] for k in ("accuracy", "auroc", "nonzero", "converged", "n_iter")}
    except ProbeError as exc:
        raise QuantizerError(f"qrealign could not fit probes: {exc}") from None
    unconverged = [i for i, m in layers.items() if not m["converged"]]
    if unconverged:
        log.warning("qrealign probes: saga did not converge in %d iterations on layer(s) %s",
                    opts.probe_max_iter, unconverged)
    meta = {"n": len(records), "n_train": int(len(split[0])), "n_test": int(len(split[1])),
            "last_layer": acts.last_layer, "layers": {str(k): v for k, v in layers.items()}}
    return probes, meta


# ---------------------------------------------------------------------------------------------
# the objective


def qrealign_loss(
    hidden_q: torch.Tensor,
    hidden_fp: torch.Tensor,
    malicious: torch.Tensor,
    w: torch.Tensor,
    b: float | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    margin: float = 0.0,
    realign: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]] | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Q-realign's per-block loss on a batch ``[B, T, H]`` (left padded: position -1 is the last
    prompt token of every row): benign rows give the MSE of the quantized block output to the FP
    one over their unmasked tokens and every channel; malicious rows give
    ``softplus(margin - (h_q[-1] . w + b))`` (``margin`` 0 in the paper). Returns the mean over rows and the logged terms (``mse`` and
    ``probe`` means over the rows of each kind present, ``logit`` the mean probe logit of the
    malicious rows). ``realign`` replaces the malicious term (a
    :class:`~quantizers.realign_losses.BlockRealign`: the quantized and FP outputs at the last
    token and each malicious row's calibration sample index, from ``rows``, to per-row losses and
    logged terms)."""
    if hidden_q.shape != hidden_fp.shape or hidden_q.dim() != 3:
        raise QuantizerError(
            f"qrealign loss: hidden states must be [batch, tokens, hidden] of one shape, got "
            f"{tuple(hidden_q.shape)} and {tuple(hidden_fp.shape)}"
        )
    malicious = malicious.to(device=hidden_q.device, dtype=torch.bool).reshape(-1)
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise QuantizerError("qrealign loss: the last position is padding; batches must be left padded")
    hq, hf = hidden_q.float(), hidden_fp.float()
    per_row = hq.new_zeros(hq.shape[0])
    terms: dict[str, float] = {}
    benign = ~malicious
    if bool(benign.any()):
        sq = (hq[benign] - hf[benign]).pow(2).mean(dim=-1)  # [rows, T]
        if attention_mask is not None:
            m = attention_mask[benign].to(sq.dtype)
            mse = (sq * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        else:
            mse = sq.mean(dim=-1)
        per_row = per_row.index_put((benign.nonzero(as_tuple=True)[0],), mse)
        terms["mse"] = float(mse.detach().mean())
    if bool(malicious.any()) and realign is not None:
        index = malicious.nonzero(as_tuple=True)[0]
        loss, extra = realign(hq[malicious][:, -1, :], hf[malicious][:, -1, :], rows.to(index.device)[index])
        per_row = per_row.index_put((index,), loss)
        terms.update(extra)
    elif bool(malicious.any()):
        logit = hq[malicious][:, -1, :] @ w.to(hq.device, hq.dtype) + torch.as_tensor(b, dtype=hq.dtype,
                                                                                         device=hq.device)
        probe = F.softplus(margin - logit)
        per_row = per_row.index_put((malicious.nonzero(as_tuple=True)[0],), probe)
        terms["probe"] = float(probe.detach().mean())
        terms["logit"] = float(logit.detach().mean())
    return per_row.mean(), terms


# ---------------------------------------------------------------------------------------------
# one block with learnable clipping and smoothing


class _LearnableLinear(nn.Module):
    """A Linear of the block being calibrated: its weight (already smoothed when the shared scale
    sites are attached, see :mod:`quantizers.transforms`) fake-quantized with learnable
    per-channel clipping; its input fake-quantized per token."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, quantize: bool, clip_init: float,
                 fused: bool = True, few_token: bool = True) -> None:
        super().__init__()
        self.linear = linear
        self.fused = fused
        self.few_token = few_token
        self.scheme = scheme
        self.quantize = quantize and scheme.quantizes_weights
        self.act_quant = quantize and scheme.quantizes_activations
        self.clip_up: nn.Parameter | None = None
        self.clip_low: nn.Parameter | None = None
        #: ``quantized()`` computed once for no-grad forwards (:meth:`QRealignBlock.frozen`)
        self.frozen: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._stats: tuple[tuple[int, int], RangeStats] | None = None
        if self.quantize:
            out_f, in_f = linear.weight.shape
            g = scheme.w_group_size
            shape = (out_f,) if g is None else (out_f, math.ceil(in_f / g))
            logit = _CLIP_ONE_LOGIT if clip_init >= 1.0 else math.log(clip_init / (1.0 - clip_init))
            dev = linear.weight.device
            self.clip_up = nn.Parameter(torch.full(shape, logit, dtype=torch.float32, device=dev))
            if not scheme.w_symmetric:
                self.clip_low = nn.Parameter(torch.full(shape, logit, dtype=torch.float32, device=dev))

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.clip_up, self.clip_low) if p is not None]

    def _range_stats(self) -> RangeStats | None:
        """The weight's per-channel range when no smoothing scale changes it (down_proj; every
        Linear without smoothing), measured once and reused while the weight tensor is the same;
        None for a smoothed weight, which changes at every step."""
        from torch.nn.utils import parametrize

        if not self.fused or parametrize.is_parametrized(self.linear, "weight"):
            return None
        weight = self.linear.weight
        key = (weight.data_ptr(), weight._version)
        if self._stats is None or self._stats[0] != key:
            s = self.scheme
            self._stats = (key, range_stats(weight.float(), group_size=s.w_group_size, symmetric=s.w_symmetric))
        return self._stats[1]

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight as the quantized layer will hold it (learned clipping applied) and the bias."""
        w = self.linear.weight.float()
        b = self.linear.bias.float() if self.linear.bias is not None else None
        if self.quantize:
            s = self.scheme
            w = fake_quant_weight(
                w, s.w_bits, group_size=s.w_group_size, symmetric=s.w_symmetric,
                clip_ratio=torch.sigmoid(self.clip_up),
                clip_ratio_low=torch.sigmoid(self.clip_low) if self.clip_low is not None else None,
                fused=self.fused,  # re-quantized at every step: the hand-written backward is the cheap one
                stats=self._range_stats(),
            )
        return w, b

    def _few_token_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, column factor)`` for :func:`~quantizers.few_token_linear.few_token_linear`
        when it applies to this training forward (a fused, quantized weight read by at most
        ``MAX_TOKENS`` tokens: the malicious steps' last-token Linears, and the Linears of prompts
        that short), else None."""
        from torch.nn.utils import parametrize

        from .few_token_linear import MAX_TOKENS, few_token_support
        from .transforms import column_factor

        if not (self.few_token and self.fused and self.quantize and torch.is_grad_enabled()) \
                or x.numel() > MAX_TOKENS * x.shape[-1]:
            return None
        parts = column_factor(self.linear)
        bias = self.linear.bias
        if parts is None or (bias is not None and parametrize.is_parametrized(self.linear, "bias")):
            return None
        if few_token_support(x, parts[0], parts[1], self.scheme.w_group_size, bias) is not None:
            return None
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few = self._few_token_parts(x)
        if few is None:
            w, b = self.frozen if self.frozen is not None and not torch.is_grad_enabled() else self.quantized()
        if self.act_quant:
            s = self.scheme
            x = fake_quant_activation(x, s.a_bits, symmetric=s.a_symmetric, clip_ratio=s.a_clip_ratio, fused=self.fused)
        if few is None:
            return F.linear(x.float(), w, b).to(x.dtype)
        from .few_token_linear import few_token_linear

        s, (weight, factor) = self.scheme, few
        y = few_token_linear(x.float(), weight, factor, s.w_bits, symmetric=s.w_symmetric,
                             clip_ratio=torch.sigmoid(self.clip_up),
                             clip_ratio_low=torch.sigmoid(self.clip_low) if self.clip_low is not None else None,
                             bias=self.linear.bias.float() if self.linear.bias is not None else None,
                             stats=self._range_stats() if factor is None else None)
        return y.to(x.dtype)


class QRealignBlock:
    """Learnable clipping and smoothing installed on decoder block ``index`` of ``model``.

    Smoothing uses the shared scale sites of :mod:`quantizers.transforms` (norm -> q/k/v,
    norm -> gate/up, v -> o, and q <-> k when keys are quantized, tied over each head's RoPE pairs)
    with learnable :class:`~quantizers.transforms.Scale` vectors initialised by SmoothQuant's rule
    from ``act_max`` (per-input-channel maxima by qualified Linear name; ``None``: no smoothing).
    :meth:`install` swaps the block's Linears for learnable wrappers (and attaches the scales as
    parametrisations); the block then computes ``Q_i(x; theta)``. :meth:`param_groups` gives the
    AdamW groups; :meth:`fold` fuses the scales into the norms and weights, quantizes the weights
    with the learned clipping, and puts the original modules back. ``skip(name)`` says which
    linears (name inside the block) stay in floating point. ``fused``: the weights' fake-quant
    through the hand-written straight-through node (``fake_quant(fused=True)``; False: plain
    autograd, the same values, slower, kept for ``bench/bench_qrealign_step.py``). ``few_token``
    (with ``fused``): a Linear that a training forward runs on at most
    :data:`~quantizers.few_token_linear.MAX_TOKENS` tokens (the malicious steps' last-token
    Linears, and every Linear of a prompt that short) goes through
    :func:`~quantizers.few_token_linear.few_token_linear`,
    which never builds the weight-sized gradient (False: the fused node and autograd's ``mul``
    for the smoothing, the same values, kept for the bench and the tests).
    """

    def __init__(self, model: nn.Module, index: int, scheme: QuantScheme, opts: QRealignOptions,
                 act_max: Mapping[str, torch.Tensor] | None, skip: Callable[[str], bool] = lambda _n: False,
                 fused: bool = True, few_token: bool = True) -> None:
        self.layer = decoder_layers(model)[index]
        self.scheme = scheme
        self.opts = opts
        self.linears: dict[str, _LearnableLinear] = {}
        for name, module in list(self.layer.named_modules()):
            if isinstance(module, nn.Linear):
                self.linears[name] = _LearnableLinear(module, scheme, not skip(name), opts.clip_init, fused, few_token)
        self.scales: dict[str, nn.Parameter] = {}
        self._chains: list = []
        if act_max is not None:
            self._setup_smoothing(model, index, act_max)
        self._installed = False

    def _setup_smoothing(self, model: nn.Module, index: int, act_max: Mapping[str, torch.Tensor]) -> None:
        from .smoothquant import smoothing_scales
        from .transforms import Scale, scale_sites, site_chains

        kinds = ["norm_qkv", "norm_mlp", "vo"] + (["qk"] if self.scheme.quantizes_kv else [])
        device = next(self.layer.parameters()).device
        sites = scale_sites(model, kinds, layers=[index])
        scales = {}
        for site in sites:
            init = None if site.kind == "qk" else smoothing_scales(site, act_max, self.opts.smooth_alpha, _SCALE_MIN)
            scales[site.name] = Scale(site.size, init=init, learnable=True).to(device)
            self.scales[site.kind] = scales[site.name].value
        self._chains = site_chains(sites, scales)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: smoothing scales at ``lr_smooth``, clipping factors at ``lr_clip``."""
        groups = []
        if self.scales:
            groups.append({"params": list(self.scales.values()), "lr": self.opts.lr_smooth})
        clips = [p for m in self.linears.values() for p in m.clip_parameters()]
        if clips:
            groups.append({"params": clips, "lr": self.opts.lr_clip})
        return groups

    def _swap(self, replace: bool) -> None:
        for name, wrapper in self.linears.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.layer.get_submodule(parent_name) if parent_name else self.layer
            setattr(parent, child, wrapper if replace else wrapper.linear)

    def install(self) -> QRealignBlock:
        """Freeze the block, attach the scales, swap in the learnable wrappers."""
        from .transforms import attach_chains

        for p in self.layer.parameters():
            p.requires_grad_(False)
        attach_chains(self._chains)
        self._swap(True)
        self._installed = True
        return self

    @contextlib.contextmanager
    def frozen(self) -> Iterator[QRealignBlock]:
        """No-grad forwards inside reuse each Linear's quantized weight and the smoothed norm
        weights, computed once, instead of re-quantizing them on every call (the propagation of
        ``X_q`` runs the block once per calibration sample with the parameters fixed)."""
        from torch.nn.utils import parametrize

        with torch.no_grad(), parametrize.cached():
            for m in self.linears.values():
                m.frozen = m.quantized()
            try:
                yield self
            finally:
                for m in self.linears.values():
                    m.frozen = None

    @torch.no_grad()
    def fold(self) -> None:
        """Fuse the scales into the norms and weights, fake-quantize the weights with the learned
        clipping (in place), and restore the block's original modules."""
        from .transforms import detach_chains

        results = {name: m.quantized() for name, m in self.linears.items()}
        detach_chains(self._chains)  # the smoothed values stay: norm weights, biases, weights
        for name, m in self.linears.items():
            # + 0.0: the fused fake-quant gives -0.0 where a weight rounds to zero from below, the
            # formula +0.0; equal values, and with this the same bytes in the saved model
            m.linear.weight.copy_((results[name][0] + 0.0).to(m.linear.weight.dtype))
        self.remove()

    def remove(self) -> None:
        """Restore the original modules (without fusing scales that were not folded)."""
        from .transforms import detach_chains

        if self._installed:
            self._swap(False)
            self._installed = False
        detach_chains(self._chains)


# ---------------------------------------------------------------------------------------------
# the quantizer


def _batches(tokenizer: Any, records: Sequence[Mapping[str, Any]], opts: QRealignOptions,
             device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Chat-formatted prompts (end kept at ``seq_len`` tokens), ``batch_size`` per batch, left padded
    with explicit position ids so every row's last position is its last prompt token."""
    pad_id = pad_token_id(tokenizer)
    ids = []
    for r in records:
        text = chat_prompt(tokenizer, r["prompt"], opts.system_prompt)
        toks = list(tokenizer(text, add_special_tokens=False)["input_ids"])[-opts.seq_len:]
        if not toks:
            raise QuantizerError(f"calibration prompt {r['id']!r} tokenizes to nothing; remove it")
        ids.append(toks)
    return [left_pad(ids[start:start + opts.batch_size], pad_id, positions="padded", device=device)
            for start in range(0, len(ids), opts.batch_size)]


@register_quantizer
class QRealignQuantizer(Quantizer):
    """Q-realign: block-wise OmniQuant-style calibration whose loss realigns harmful prompts with
    the aligned model's SLR probes while keeping benign outputs (see the module docstring)."""

    name = "qrealign"
    description = "block-wise LWC + smoothing calibration with a probe loss that restores refusals (Q-realign)"
    Options = QRealignOptions
    uses_calibration_prompts = True
    # Probes, parent targets and the FP diagnostics are read before the first change (from the
    # model itself when no reference is given): `safequant quantize` calibrates the subject in place.
    uses_reference_model = False

    def check(self, scheme: QuantScheme) -> None:
        if not scheme.quantizes_weights:
            raise QuantizerError(
                f"qrealign learns weight clipping, but scheme {scheme.label!r} leaves weights in floating point; "
                "use w8a8 (the paper's default) or w4a4"
            )
        if scheme.w_clip_search:
            raise QuantizerError(
                f"scheme {scheme.label!r} asks for an MSE clip search (-wmse); qrealign learns the clipping "
                "itself: drop -wmse"
            )
        if scheme.fp_prefix:
            raise QuantizerError(
                f"scheme {scheme.label!r} keeps prefix tokens in full precision (-fpprefix); qrealign's own "
                "calibration forward does not support that yet: drop -fpprefix"
            )

    def check_model(self, model: nn.Module) -> None:
        """Probes read from a file (``probes_from``) must cover exactly the model's decoder layers
        at its width: probes of another model's depth or width are rejected before any work."""
        if str(self.options.probes_from).strip().lower() == "reference":
            return
        layers = decoder_layers(model)
        hidden = int(getattr(model.config, "hidden_size", 0) or layers[0].self_attn.o_proj.out_features)
        probes, meta, _ = self._probes(model, QuantContext(), [])
        probe_directions(probes, len(layers), hidden, meta["source"])

    def effective_scheme(self, scheme: QuantScheme) -> QuantScheme:
        """The scheme as quantized: asymmetric weights unless ``asym_weights=false``."""
        return scheme.replace(w_symmetric=False) if self.options.asym_weights else scheme

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        opts: QRealignOptions = self.options
        t_start = time.perf_counter()
        scheme = self.effective_scheme(scheme)
        if ctx.tokenizer is None:
            raise QuantizerError("qrealign needs the model's tokenizer (ctx.tokenizer) to format calibration prompts")
        layers = decoder_layers(model)
        n_layers = len(layers)
        hidden = int(getattr(model.config, "hidden_size", 0) or layers[0].self_attn.o_proj.out_features)
        device = next(model.parameters()).device

        # ---- validate everything before touching the model (no partial artifact)
        self._probe_blocks = _probe_blocks(opts.probe_blocks, n_layers)
        records = _check_records(ctx.calibration_prompts)
        chosen = select_calibration(records, opts.n_prompts, opts.malicious_fraction, ctx.seed)
        probes, probe_meta, probe_records = self._probes(model, ctx, records)
        directions = probe_directions(probes, n_layers, hidden, probe_meta["source"])
        batches = _batches(ctx.tokenizer, chosen, opts, device)
        labels = [torch.tensor([r["label"] == "harmful" for r in chosen[i:i + opts.batch_size]])
                  for i in range(0, len(chosen), opts.batch_size)]
        if opts.smooth:
            from .transforms import model_parts

            model_parts(model)  # smoothing needs a Llama-style block: fail here, before any change
        names = {id(m): n for n, m in model.named_modules()}
        layer_names = [names[id(layer)] for layer in layers]
        self._targets = self._parent_targets(model, ctx, chosen)  # the FP parent: before KV quantization
        if scheme.quantizes_kv:
            enable_kv_quant(model, scheme)  # raises for an unsupported architecture, before any weight change

        diag_records = diagnostic_records(records, chosen, probe_records, opts, ctx.seed)
        diagnose = _diagnoser(ctx, diag_records, directions, opts)
        diagnostics = {"aligned": diagnose(ctx.probe_model), "fp": diagnose(model)} if diagnose else None
        # The aligned parent and the FP reference are done with (probes, targets, diagnostics read):
        # drop them before the blocks calibrate, one model in memory (a caller's own reference stays).
        ctx.release("probe_model", "reference_model")

        # ---- statistics and block inputs of the FP model
        stats: dict[str, torch.Tensor] = {}
        if opts.smooth:
            layout = layout_of(model) or LLAMA  # the smoothing sites read these projections' inputs
            wanted = tuple(p for p in (getattr(layout, f) for f in ("q", "k", "v", "o", "gate", "up")) if p)
            stats = input_channel_absmax(model, batches, select=lambda n, m: isinstance(m, nn.Linear)
                                         and n.endswith(wanted) and n.startswith(tuple(layer_names)))
        # ---- block by block: each block learns on its FP outputs and its quantized inputs
        logs: list[dict[str, Any]] = []
        done: set[str] = set()
        for blk in BlockPipeline(model, batches, full_precision=True):
            block, entry = self._calibrate_block(model, blk, scheme, stats if opts.smooth else None, directions[blk.index],
                                                 labels, n_layers, ctx, device)
            done.update(f"{blk.name}.{n}" for n, m in block.linears.items() if m.quantize or m.act_quant)
            logs.append(entry)
        loss_meta = {"terms": list(opts.loss_terms), "probe_blocks": sorted(self._probe_blocks), **({"parent_targets": self._targets.describe()}
                                                        if self._targets is not None else {})}
        self._targets = None  # the parent's targets are needed only while the blocks calibrate

        def weight_fn(name: str, linear: nn.Linear, s: QuantScheme) -> torch.Tensor:
            if name in done:
                return linear.weight.detach().clone()  # already on the grid, with the learned clipping
            return default_weight_fn(name, linear, s)

        quantize_linear_layers(model, scheme, weight_fn=weight_fn, progress=ctx.progress)
        if diagnostics is not None:
            self.metadata["diagnostics"] = _diagnostics_metadata(diagnostics, diagnose(model), diag_records)
        self.metadata["calibration_prompts"] = _calibration_metadata(chosen, probe_records)
        self.metadata["probes"] = probe_meta
        self.metadata["effective_scheme"] = scheme.label
        self.metadata["blocks"] = logs
        self.metadata["loss"] = loss_meta
        self.metadata["seconds"] = round(time.perf_counter() - t_start, 2)
        self.metadata["peak_memory_bytes"] = peak_memory_bytes(device)
        return model


    def _probes(self, model: nn.Module, ctx: QuantContext,
                records: list[dict[str, Any]]) -> tuple[Mapping[int, Any], dict[str, Any], list[dict[str, Any]]]:
        """The SLR probes whose directions the malicious loss pushes along: fitted on the aligned
        model (``probes_from="reference"``, on every calibration record) or loaded from a file;
        with their metadata and the records they were fitted on."""
        opts: QRealignOptions = self.options
        if str(opts.probes_from).strip().lower() == "reference":
            probe_model = ctx.probe_model or ctx.reference_model or model
            probes, probe_meta = fit_probes(probe_model, ctx.tokenizer, records, opts, ctx.seed)
            src = "probe_model" if ctx.probe_model is not None else (
                "reference_model" if ctx.reference_model is not None else "subject (FP)")
            return probes, {"source": f"fitted on {src}", **probe_meta}, records
        from probes.errors import ProbeError
        from probes.slr import load_probes

        path = resolve_probe_file(opts.probes_from)
        try:
            probes, doc = load_probes(path)
        except ProbeError as exc:
            raise QuantizerError(f"probes_from {opts.probes_from!r}: {exc}") from None
        return probes, {"source": str(path), "metadata": doc.get("metadata", {})}, []

    def _parent_targets(self, model: nn.Module, ctx: QuantContext, chosen: Sequence[Mapping[str, Any]]):
        """The aligned parent's targets on the calibration samples when the ``loss`` terms need them
        (None for the paper's loss); the parent is the model the probes are fitted on."""
        from .realign_losses import parent_targets, uses_parent

        opts: QRealignOptions = self.options
        if not uses_parent(opts.loss_terms):
            return None
        parent = ctx.probe_model or ctx.reference_model or model
        source = "probe_model" if ctx.probe_model is not None else (
            "reference_model" if ctx.reference_model is not None else "subject (FP)")
        texts = [chat_prompt(ctx.tokenizer, r["prompt"], opts.system_prompt) for r in chosen]
        return parent_targets(parent, ctx.tokenizer, texts, [r["label"] == "harmful" for r in chosen],
                              opts.loss_terms, opts.output_blocks, opts.seq_len, source)

    def _block_realign(self, model: nn.Module, index: int, direction: tuple[torch.Tensor, float], n_layers: int):
        """The malicious rows' loss of block ``index`` for the ``loss`` option (None: the paper's,
        computed inside :func:`qrealign_loss`)."""
        from .realign_losses import BlockRealign

        from .realign_losses import REPRESENTATION_TERMS

        opts: QRealignOptions = self.options
        terms = opts.loss_terms
        if index not in self._probe_blocks:
            terms = tuple(t for t in terms if t not in REPRESENTATION_TERMS)
        if terms == ("probe",):
            return None
        return BlockRealign(terms, index, n_layers, direction, opts.probe_margin, self._targets, model,
                            opts.output_blocks, opts.output_weight)

    def _calibrate_block(self, model: nn.Module, blk: Block, scheme: QuantScheme,
                         act_max: Mapping[str, torch.Tensor] | None, direction: tuple[torch.Tensor, float],
                         labels: Sequence[torch.Tensor], n_layers: int, ctx: QuantContext,
                         device: torch.device) -> tuple[QRealignBlock, dict[str, Any]]:
        """One block's turn in the pipeline: learn clipping and scales on ``X_q`` against
        ``F_i(X_fp)``, hand the outputs on (before folding), fold; returns the block and its log."""
        opts: QRealignOptions = self.options
        i, layer, x_q, y_fp, kwargs, masks = blk.index, blk.layer, blk.inputs, blk.fp_outputs, blk.kwargs, blk.masks
        block = QRealignBlock(model, i, scheme, opts, act_max, skip=lambda n, p=blk.name: scheme.skips(f"{p}.{n}"))
        block.install()
        w, b = direction
        w = w.to(device)
        realign = self._block_realign(model, i, direction, n_layers)
        rows = [torch.arange(k * opts.batch_size, k * opts.batch_size + len(labels[k])) for k in range(len(x_q))]

        forward = _step_forward(layer, x_q, y_fp, kwargs, masks, labels)

        def loss_fn(k: int, _step: int):
            out, target, mask = forward(k)
            return qrealign_loss(out, target, labels[k], w, b, mask, margin=opts.probe_margin,
                                 realign=realign, rows=rows[k])

        groups = block.param_groups()
        epochs = opts.epochs_for(i, n_layers)
        steps = epochs * len(x_q)
        stage = f"qrealign block {i + 1}/{n_layers}"
        if groups and steps > 0:
            with torch.enable_grad():
                cal = run_calibration(loss_fn, groups, list(range(len(x_q))), steps, stage=stage,
                                      progress=ctx.progress, device=device)
        else:
            cal = CalibrationLog(stage=stage, steps_planned=0)
        with block.frozen():
            blk.outputs = blk.run(x_q)  # with the learned clipping and scales, before folding
            final = [qrealign_loss(blk.outputs[k], y_fp[k], labels[k], w, b, masks[k], margin=opts.probe_margin,
                                   realign=realign, rows=rows[k])[1] for k in range(len(x_q))]
        block.fold()
        entry = cal.to_dict(max_points=50)
        entry.update(block=i, epochs=epochs, final=_mean_terms(final))
        log.info("qrealign block %d/%d: %d steps in %.1fs, final %s", i + 1, n_layers, cal.steps_run,
                 cal.seconds, entry["final"])
        return block, entry


def _probe_blocks(spec: str, n_layers: int) -> set[int]:
    """The block indices of the ``probe_blocks`` option for a model of ``n_layers`` blocks."""
    from probes.capture import parse_layers
    from probes.errors import ProbeError

    try:
        return set(parse_layers(str(spec), n_layers))
    except ProbeError as exc:
        raise QuantizerError(f"qrealign option probe_blocks={spec!r}: {exc}") from None


def _step_forward(layer: nn.Module, x_q: Sequence[torch.Tensor], y_fp: Sequence[torch.Tensor],
                  kwargs: Sequence[Mapping[str, Any]], masks: Sequence[torch.Tensor | None],
                  labels: Sequence[torch.Tensor]) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, Any]]:
    """``forward(k)``: the block output, the FP target and the mask that batch ``k``'s loss reads.

    The malicious loss reads the last prompt token only, so an all-malicious batch runs the block
    at that position alone (:func:`~quantizers.last_token.last_token_forward`: the same value and
    gradients, about a tenth of the token work) and gets ``[B, 1, H]`` outputs and targets;
    benign and mixed batches run the whole block. A layer the last-token forward does not know,
    or whose last-token output differs from the full forward's on the first malicious batch
    (checked here, without gradients), runs the whole block for every batch. A loss term that
    reads other positions of a malicious row must not go through the last-token forward.
    """
    from .last_token import last_token_forward, last_token_support

    malicious = [bool(lab.all()) for lab in labels]
    first = next((k for k, m in enumerate(malicious) if m), None)
    reason = None if first is None else last_token_support(layer, kwargs[first])
    if first is not None and reason is None:
        with torch.no_grad():
            full = run_layer(layer, x_q[first], kwargs[first])[:, -1:]
            fast = last_token_forward(layer, x_q[first], kwargs[first])
        if not _same_up_to_rounding_flips(fast, full):
            reason = f"its output differs from the full block's by up to {float((fast - full).abs().max()):.3g}"
    if reason is not None:
        log.warning("qrealign: malicious steps run the whole block, not the last token only: %s", reason)
        malicious = [False] * len(labels)

    def forward(k: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if malicious[k]:
            mask = masks[k][:, -1:] if masks[k] is not None else None
            return last_token_forward(layer, x_q[k], kwargs[k]), y_fp[k][:, -1:], mask
        return run_layer(layer, x_q[k], kwargs[k]), y_fp[k], masks[k]
    return forward


def _same_up_to_rounding_flips(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float rounding, except where float noise flipped an activation's rounding to the
    next grid point (SmolLM2's deep blocks carry channels in the hundreds, so one flipped 8-bit
    step of such a token moves the output by tenths): at least 99% of the elements agree to
    1e-4 and the mean difference is under 1e-3 of the mean magnitude. A forward that computed
    something else would differ almost everywhere."""
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())).float().mean()
    return bool(close >= 0.99) and float((got - want).abs().mean()) <= 1e-3 * float(want.abs().mean())


def _mean_terms(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)), 6) for k in keys}
