"""Turning a variant spec into a quantized model: one path for `safequant quantize` and the audit.

Both commands resolve the unaligned reference (`--base`: a model, `none`, or `ablated`), draw
calibration data only for methods that need it, hand calibration prompts to prompt-based methods
after checking them against the evaluation prompts, run the quantizer, and describe what was
done (options, metadata, calibration fingerprint, time) for variant.json and the run summary.
Saved variant folders are loaded here too, so an audit of a saved variant and of the same
variant quantized in memory go through the same bookkeeping.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.prompts import PromptFootprint
from harness.calibration_data import (CHAT_PREFIX, CalibrationOptions, calibration_text, load_calibration,
                                      load_calibration_prompts)
from harness.errors import UserError
from harness.models import ALIGNED_PARENTS, LoadedModel, load_model, resolve_model
from quantizers import QuantContext, QuantScheme, build_quantizer, get_quantizer

__all__ = ["CalibrationOptions", "BaseReference", "QuantizedVariant", "resolve_base", "resolve_probe_model",
           "quantize_variant", "load_saved_variant", "calibration_overlap", "check_calibration_overlap", "ABLATED", "ALIGNED_PARENTS",
           "check_calibration_inputs", "check_context", "hub_offline"]

log = logging.getLogger(__name__)

#: ``--base ablated``: build the unaligned reference from the subject by refusal-direction ablation.
ABLATED = "ablated"


@dataclass
class BaseReference:
    """The unaligned reference model (AAQ's push target) and where it came from."""

    model: nn.Module | None
    description: dict[str, Any] | None


@dataclass
class QuantizedVariant:
    """A quantized model plus the record that goes into variant.json and the run summary."""

    model: nn.Module
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def resolve_base(base: str | None, subject: LoadedModel, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, calib: CalibrationOptions | None = None,
                 ablate_layer: int | None = None) -> BaseReference:
    """Load the base model named by ``base``; ``"ablated"`` builds it from the subject; None: no base."""
    if base is None or base.lower() == "none":
        return BaseReference(None, None)
    if base.lower() == ABLATED:
        from harness.ablation import ablate_refusal

        started = time.perf_counter()
        result = ablate_refusal(subject.model, subject.tokenizer, layer=ablate_layer,
                                prompts=(calib or CalibrationOptions()).prompts)
        return BaseReference(result.model, {"name": ABLATED, "spec": ABLATED, "from": subject.fingerprint,
                                            **result.describe(), "seconds": round(time.perf_counter() - started, 2)})
    loaded = load_model(resolve_model(base), device, dtype, trust_remote_code)
    check_pair(subject, loaded)
    return BaseReference(loaded.model, loaded.describe())


def resolve_probe_model(spec: str | None, subject: LoadedModel, *, device: str = "auto", dtype: str = "auto",
                        trust_remote_code: bool = False) -> nn.Module | None:
    """The aligned model that probe-based methods (Q-realign) fit their probes on.

    ``"auto"``: the known aligned parent of a bundled model (toy-chat for toy-chat-eroded), else the
    subject itself (``None``); ``"subject"``/``"none"``: the subject; anything else is loaded as a
    model and must share the subject's hidden size and tokenizer vocabulary.
    """
    if spec is None or spec.lower() in ("none", "subject"):
        return None
    if spec == "auto":
        spec = ALIGNED_PARENTS.get(subject.source.spec)
        if spec is None:
            return None
    loaded = load_model(resolve_model(spec), device, dtype, trust_remote_code)
    if loaded.model.config.hidden_size != subject.model.config.hidden_size or len(loaded.tokenizer) != len(subject.tokenizer):
        raise UserError(f"--probe-model {spec!r} (hidden {loaded.model.config.hidden_size}) does not match "
                        f"{subject.source.spec!r} (hidden {subject.model.config.hidden_size}): probes must come from "
                        "the aligned model of the same family")
    return loaded.model


def check_pair(subject: LoadedModel, base: LoadedModel) -> None:
    """FT and PT must share the architecture and vocabulary (AAQ's rule,
    :func:`quantizers.aaq.check_model_pair`), the width and the tokenizer's size."""
    from quantizers.aaq import check_model_pair

    check_model_pair(subject.model, base.model)
    s_width, b_width = subject.model.config.hidden_size, base.model.config.hidden_size
    if s_width != b_width or len(subject.tokenizer) != len(base.tokenizer):
        raise UserError(f"base model {base.source.spec!r} (hidden {b_width}, tokenizer {len(base.tokenizer)}) does not "
                        f"match {subject.source.spec!r} (hidden {s_width}, tokenizer {len(subject.tokenizer)}): give "
                        "the base model of the same family, or --base ablated")

def hub_offline() -> bool:
    """True when the Hugging Face hub must not be reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_calibration_inputs(calib: CalibrationOptions, model_kind: str, seed: int, *, text: bool,
                             prompts: bool) -> None:
    """Before any model loads: the calibration text (``text``) and prompts (``prompts``) a run
    will need exist and can be read, and a hub dataset is not asked for while offline."""
    if text:
        spec = calib.spec(model_kind, seed)
        if spec.source.startswith("dataset:"):
            ds_id = spec.source.split(":")[1] if spec.source.count(":") >= 2 else ""
            if hub_offline() and not Path(ds_id).is_dir():
                raise UserError(f"calibration text {spec.source!r} (--calib-text {calib.text}) needs the Hugging Face "
                                "hub, which is offline: pass --calib-text FILE with a local UTF-8 text, e.g. "
                                "WikiText-2 train saved as wiki.train.raw")
        elif spec.source.startswith(CHAT_PREFIX):  # answered by the model later: its prompts must load now
            load_calibration_prompts(spec.source[len(CHAT_PREFIX):] or "calibration")
        else:
            calibration_text(spec.source)
    if prompts:
        load_calibration_prompts(calib.prompts)


def check_context(calib: CalibrationOptions, model: nn.Module, *, text: bool) -> None:
    """Right after the model loads, before any work: calibration windows must fit its context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if text and isinstance(limit, int) and calib.length > limit:
        raise UserError(f"--calib-len {calib.length} is longer than the model's {limit}-token context: "
                        f"pass --calib-len {limit} or less")


def calibration_overlap(calibration: Iterable[dict], evaluation: Iterable[tuple[str, str, str]]) -> list[str]:
    """``set/id`` of evaluation prompts that are also calibration prompts, by the one rule of
    :class:`common.prompts.PromptFootprint` (same normalised text, or same id).
    ``evaluation`` yields ``(set, id, prompt)``."""
    footprint = PromptFootprint.of(calibration)
    return [f"{name}/{rid}" for name, rid, prompt in evaluation if footprint.matches(rid, prompt)]


def check_calibration_overlap(method: str, calib: CalibrationOptions, evaluation: list[tuple[str, str, str]]) -> None:
    """Before anything runs: refuse evaluation prompts that ``method`` would calibrate on."""
    if getattr(get_quantizer(method), "uses_calibration_prompts", False):
        _check_overlap(load_calibration_prompts(calib.prompts), evaluation, calib, method)


def _check_overlap(calibration: list[dict], evaluation: list[tuple[str, str, str]] | None, calib: CalibrationOptions,
                   method: str) -> None:
    if not evaluation or calib.allow_overlap:
        return
    clash = calibration_overlap(calibration, evaluation)
    if clash:
        raise UserError(f"{len(clash)} evaluation prompts (e.g. {clash[0]}) are also {method} calibration prompts "
                        f"(--calib-prompts {calib.prompts}): evaluate on other prompts, calibrate on other prompts, "
                        "or pass --allow-calibration-overlap")


def quantize_variant(method: str, scheme: QuantScheme, options: dict[str, Any], subject: LoadedModel,
                     base: BaseReference, calib: CalibrationOptions, seed: int, *,
                     evaluation: list[tuple[str, str, str]] | None = None,
                     probe_model: nn.Module | None = None, system_prompt: str | None = None) -> QuantizedVariant:
    """Quantize a copy of the subject (``fp`` returns the subject itself) and describe it.

    A method with a ``system_prompt`` option (Q-realign renders its calibration prompts with the
    chat template) gets the evaluation's system prompt unless the variant sets its own, so that
    calibration and evaluation see the same template (a pitfall of the released Q-realign code).
    """
    cls = get_quantizer(method)
    if system_prompt is not None and "system_prompt" in cls.option_names() and "system_prompt" not in options:
        options = {**options, "system_prompt": system_prompt}
    quantizer = build_quantizer(method, options)
    calibration = None
    ctx = QuantContext(tokenizer=subject.tokenizer, reference_model=subject.model, base_model=base.model,
                       device=next(subject.model.parameters()).device, seed=seed, probe_model=probe_model)
    if getattr(cls, "requires_calibration", False):
        calibration = load_calibration(calib.spec(subject.source.kind, seed), subject.tokenizer, subject.model)
        ctx.calibration_batches = calibration.batches
    prompt_meta = None
    if getattr(cls, "uses_calibration_prompts", False):
        prompts = load_calibration_prompts(calib.prompts)
        _check_overlap(prompts, evaluation, calib, method)
        ctx.calibration_prompts = prompts
        prompt_meta = {"source": calib.prompts, "ids": [r["id"] for r in prompts]}
    started = time.perf_counter()
    model = subject.model if method == "fp" else copy.deepcopy(subject.model)
    model = quantizer.apply(model, scheme, ctx)
    model.eval()
    seconds = time.perf_counter() - started
    used = quantizer.metadata.get("calibration_prompts") if isinstance(quantizer.metadata, dict) else None
    if prompt_meta is not None and isinstance(used, dict) and used.get("ids"):
        prompt_meta["ids"] = list(used["ids"])  # the subset the method actually calibrated on
    record = {
        "method": method, "scheme": scheme.label, "options": quantizer.options_dict(),
        "metadata": quantizer.metadata, "calibration": calibration.describe() if calibration else None,
        "calibration_prompts": prompt_meta, "base": base.description, "seconds": round(seconds, 3),
        "source_model": {"spec": subject.source.spec, "fingerprint": subject.fingerprint},
    }
    return QuantizedVariant(model, seconds, record)


def load_saved_variant(path: str, subject: LoadedModel | None, *, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None, evaluation: list[tuple[str, str, str]] | None = None,
                       calib: CalibrationOptions | None = None) -> tuple[QuantizedVariant, Any]:
    """Load a folder written by `safequant quantize`; check it was made from ``subject`` and that
    its calibration prompts (if any) are not among the evaluation prompts."""
    from quantizers.artifact import load_variant

    model, tokenizer, info = load_variant(path, device=device, dtype=dtype)
    source = info["source_model"]["fingerprint"]  # required by the variant.json schema: never empty
    if subject is not None and source != subject.fingerprint:
        raise UserError(f"saved variant {path} was quantized from a model with fingerprint {source}, but the audit's "
                        f"subject {subject.source.spec!r} has {subject.fingerprint}: audit it with --model "
                        f"{info.get('source_model', {}).get('spec', 'the model it was made from')}")
    used = (info.get("calibration_prompts") or {})
    if used.get("ids"):
        records = [r for r in load_calibration_prompts(used["source"]) if r["id"] in set(used["ids"])] \
            if used.get("source") else [{"id": i} for i in used["ids"]]
        _check_overlap(records, evaluation, calib or CalibrationOptions(prompts=used.get("source", "?")), info["method"])
    record = {k: info.get(k) for k in ("method", "scheme", "options", "metadata", "calibration", "calibration_prompts",
                                       "base", "seconds", "source_model")}
    record["artifact"] = str(path)
    return QuantizedVariant(model, 0.0, record), tokenizer

