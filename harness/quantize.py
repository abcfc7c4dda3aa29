"""The variant maker: the one way `safequant quantize`, `audit` and `probe` turn variants into models.

In the spirit of llm-compressor's single ``oneshot(model, recipe, dataset)`` entry, in two steps:

* :func:`check` (cheap, before any model loads) validates everything the variants need and
  returns a :class:`VariantMaker`: the base model (``--base``, ``auto`` from
  :data:`harness.models.UNALIGNED_BASES`, ``ablated``, ``none``), the calibration text and
  prompts, the evaluation prompts against the calibration prompts (of methods that calibrate on
  prompts and of saved variants that did), and that each method can produce its scheme.
* :meth:`VariantMaker.check_loaded` right after the subject loads (calibration windows against
  its context, saved variants against its fingerprint), :meth:`VariantMaker.prepare` (the base
  and probe models, loaded once), and :meth:`VariantMaker.make` for each variant: a quantized
  copy of the subject, or a saved
  folder loaded as saved, described the same way (options, metadata, calibration fingerprint,
  time) for variant.json and the run summary.

What a method needs is read from its quantizers (``needs_calibration_text()``, with the options,
and the flags ``needs_base_model``, ``uses_calibration_prompts``) in one place, :meth:`Needs.of`.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.prompts import PromptFootprint
from harness.artifacts import ARTIFACT_METHODS, check_artifact, load_artifact, quantization_of
from harness.calibration_data import (CHAT_PREFIX, CalibrationOptions, calibration_text, load_calibration,
                                      load_calibration_prompts)
from harness.config import VariantSpec
from harness.errors import UserError
from harness.models import ALIGNED_PARENTS, LoadedModel, ModelSource, load_model, resolve_model, unaligned_base

if TYPE_CHECKING:  # torch and the quantizer modules load with the first variant that needs them
    from torch import nn

    from quantizers import Quantizer

__all__ = ["ABLATED", "BaseReference", "Needs", "QuantizedVariant", "VariantMaker", "VariantSettings", "base_name",
           "calibration_overlap", "check"]

log = logging.getLogger(__name__)

#: ``--base ablated``: build the unaligned reference from the subject by refusal-direction ablation.
ABLATED = "ablated"


@dataclass(frozen=True)
class VariantSettings:
    """How variants are made: the settings `quantize`, `audit` and `probe` share (their ``--base``,
    ``--calib-*``, ``--probe-model``, ``--ablate-layer``, ``--seed`` and ``--system-prompt``)."""

    base: str | None = "auto"
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    probe_model: str | None = "auto"
    ablate_layer: int | None = None
    seed: int = 0
    #: the evaluation's system prompt: a method with a ``system_prompt`` option (Q-realign renders
    #: its calibration prompts in the chat template) gets it unless the variant sets its own
    system_prompt: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    #: where a ``chat:`` calibration source keeps the model's answers (harness.store.resolve_cache_dir:
    #: ``auto``, a folder, ``none``/None); the audit passes its ``--cache-dir``
    cache_dir: str | os.PathLike | None = "auto"


@dataclass(frozen=True)
class Needs:
    """What a set of variants needs besides the subject, from its quantizers' class flags."""

    text: bool = False  #: calibration text windows (``Quantizer.needs_calibration_text()``)
    prompts: bool = False  #: labelled calibration prompts (``uses_calibration_prompts``)
    base: bool = False  #: the unaligned base model (``needs_base_model``)

    @classmethod
    def of(cls, quantizers: Iterable[Quantizer]) -> Needs:
        """The needs of the variants to quantize (their quantizers, options parsed: an option such
        as QuaRot's ``weights=gptq`` can ask for calibration text); saved variants need nothing."""
        quantizers = list(quantizers)
        return cls(text=any(q.needs_calibration_text() for q in quantizers),
                   prompts=any(q.uses_calibration_prompts for q in quantizers),
                   base=any(q.needs_base_model for q in quantizers))


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
    #: the tokenizer saved with a variant folder (None for a variant quantized in memory)
    tokenizer: Any = None


def base_name(base: str | None, subject: str) -> str | None:
    """``--base`` as a model name: ``auto`` is the subject's unaligned base when it is a bundled
    model (:data:`harness.models.UNALIGNED_BASES`, else none); ``none`` or None: no base."""
    if base == "auto":
        base = unaligned_base(subject)
    if base is None or base.strip().lower() == "none":
        return None
    return ABLATED if base.strip().lower() == ABLATED else base


def check(specs: Sequence[VariantSpec], subject: ModelSource, settings: VariantSettings, *,
          evaluation: Sequence[tuple[str, str, str]] = ()) -> VariantMaker:
    """Validate, before any model loads, everything ``specs`` need to be made from ``subject``.

    ``evaluation`` yields ``(set, id, prompt)`` of every prompt the variants will be evaluated or
    probed on: none may be a prompt a variant calibrates (or was calibrated) on, unless
    ``settings.calibration.allow_overlap``. Raises :class:`UserError` naming the input and the fix.
    """
    return VariantMaker(list(specs), subject, settings, list(evaluation))


class VariantMaker:
    """Makes the variants :func:`check` accepted (build it with :func:`check`)."""

    def __init__(self, specs: list[VariantSpec], subject: ModelSource, settings: VariantSettings,
                 evaluation: list[tuple[str, str, str]]) -> None:
        self.specs, self.subject_source, self.settings, self.evaluation = specs, subject, settings, evaluation
        self.calib = settings.calibration
        self.quantizers = {s.name: _build(s, settings.system_prompt) for s in specs if not s.artifact}
        self.needs = Needs.of(self.quantizers.values())
        #: the base model's name (``auto`` resolved) whether or not a variant needs it; the audit records it
        self.base = base_name(settings.base, subject.spec)
        self.base_source = resolve_model(self.base) if self.base not in (None, ABLATED) else None
        if self.needs.base and self.base is None:
            first = next(s for s in specs if not s.artifact and self._needs(s).base)
            raise UserError(f"variant {first.name} ({first.method}) needs the unaligned base model: pass --base MODEL "
                            "or --base ablated")
        ablated = self.needs.base and self.base == ABLATED
        _check_calibration_inputs(self.calib, subject.kind, settings.seed, text=self.needs.text,
                                 prompts=self.needs.prompts or ablated)
        if self.needs.prompts:
            prompts = load_calibration_prompts(self.calib.prompts)
            for spec in specs:
                if not spec.artifact and self._needs(spec).prompts:
                    self._check_overlap(prompts, spec.method, self.calib.prompts)
        #: variant.json of each saved variant, by folder
        self._saved = {s.artifact: self._check_saved(s) for s in specs if s.artifact and s.method not in ARTIFACT_METHODS}
        self.base_model = BaseReference(None, None)
        self.probe_model: nn.Module | None = None
        #: variants still to quantize that need the base / the probe model: the last one gets the
        #: maker's own reference (:meth:`_frozen_models`), so the model is freed once it is read
        self._uses_left = {"base": sum(self._needs(s).base for s in specs if not s.artifact),
                           "prompts": sum(self._needs(s).prompts for s in specs if not s.artifact)}
        self._probe_handed_over = False
        self._scratch: Any = None  # tempfile.TemporaryDirectory for methods that save their own format

    def _needs(self, spec: VariantSpec) -> Needs:
        """What the one variant ``spec`` (not a saved folder) needs."""
        return Needs.of([self.quantizers[spec.name]])

    @property
    def saved_infos(self) -> dict[str, dict]:
        """variant.json of each saved variant, by folder (read and checked when the maker was built)."""
        return dict(self._saved)

    # -- after the subject loads ----------------------------------------------------------------
    def check_loaded(self, subject: LoadedModel) -> None:
        """Right after the subject loads, before any work: the checks that need it (calibration
        windows against its context, saved variants against its fingerprint)."""
        limit = getattr(getattr(subject.model, "config", None), "max_position_embeddings", None)
        if self.needs.text and isinstance(limit, int) and self.calib.length > limit:
            raise UserError(f"--calib-len {self.calib.length} is longer than the model's {limit}-token context: "
                            f"pass --calib-len {limit} or less")
        from quantizers import QuantizerError

        for name, quantizer in self.quantizers.items():
            try:
                quantizer.check_model(subject.model)
            except QuantizerError as exc:
                raise UserError(f"variant {name}: {exc}") from None
        for path, info in self._saved.items():
            _check_source(path, info, subject)
        for spec in self.specs:
            if spec.method in ARTIFACT_METHODS:  # a GGUF file or Hugging Face folder (harness/artifacts.py)
                check_artifact(spec.artifact, spec.name, subject)

    def prepare(self, subject: LoadedModel) -> None:
        """Load what the variants need besides the subject, once for all of them: the base model
        (or ablate it from the subject), then the aligned model Q-realign fits its probes on."""
        if self.needs.base:
            self.base_model = self._load_base(subject)
        if self.needs.prompts:
            self.probe_model = self._load_probe_model(subject)

    def make(self, spec: VariantSpec, subject: LoadedModel, *, consume_subject: bool = False,
             artifact_dir: str | None = None) -> QuantizedVariant:
        """The variant ``spec`` of ``subject``: loaded from its folder, or a quantized copy of the
        subject (``fp`` is the subject itself), with its record.

        ``consume_subject``: the caller no longer needs the full-precision subject (`safequant
        quantize`), so a method that does not read the reference model quantizes it in place, with
        no second full model in memory. ``artifact_dir``: where a method that saves its own format
        (``writes_artifact``, e.g. llm-compressor) writes it; the folder is then the product and
        is not loaded back. Without it the method writes to a scratch folder and the variant is
        that folder loaded back through :func:`harness.artifacts.load_artifact`, so the audit
        measures what the library saved."""
        if spec.method in ARTIFACT_METHODS:
            return load_artifact(spec.artifact, subject, device=self.settings.device, dtype=self.settings.dtype)
        if spec.artifact:
            return self._load_saved(spec.artifact, subject)
        return self._quantize(spec, subject, consume_subject, artifact_dir)

    # -- the check step's parts -----------------------------------------------------------------
    def _check_overlap(self, calibration: list[dict], method: str, source: str) -> None:
        if not self.evaluation or self.calib.allow_overlap:
            return
        clash = calibration_overlap(calibration, self.evaluation)
        if clash:
            raise UserError(f"{len(clash)} evaluation prompts (e.g. {clash[0]}) are also {method} calibration prompts "
                            f"(--calib-prompts {source}): evaluate on other prompts, calibrate on other prompts, "
                            "or pass --allow-calibration-overlap")

    def _check_saved(self, spec: VariantSpec) -> dict:
        """A saved variant's variant.json, its calibration prompts (recorded by id) checked against
        the evaluation."""
        from quantizers import QuantizerError
        from quantizers.artifact import read_variant_info

        try:
            info = read_variant_info(spec.artifact)
        except QuantizerError as exc:
            raise UserError(f"variant {spec.artifact!r}: {exc}") from None
        used = info.get("calibration_prompts") or {}
        if used.get("ids"):
            ids = set(used["ids"])
            records = ([r for r in load_calibration_prompts(used["source"]) if r["id"] in ids] if used.get("source")
                       else [{"id": i} for i in used["ids"]])
            self._check_overlap(records, info["method"], used.get("source", "?"))
        return info

    # -- the make step's parts ------------------------------------------------------------------
    def _load_base(self, subject: LoadedModel) -> BaseReference:
        """The unaligned base: loaded and checked against the subject, or ablated from it."""
        if self.base == ABLATED:
            from harness.ablation import ablate_refusal

            started = time.perf_counter()
            result = ablate_refusal(subject.model, subject.tokenizer, layer=self.settings.ablate_layer,
                                    prompts=self.calib.prompts)
            return BaseReference(result.model, {"name": ABLATED, "spec": ABLATED, "from": subject.fingerprint,
                                                **result.describe(), "seconds": round(time.perf_counter() - started, 2)})
        loaded = self._load(self.base_source)
        _check_pair(subject, loaded)
        return BaseReference(loaded.model, loaded.describe())

    def _load_probe_model(self, subject: LoadedModel) -> nn.Module | None:
        """The aligned model that probe-based methods (Q-realign) fit their probes on.

        ``"auto"``: the known aligned parent of a bundled model (toy-chat for toy-chat-eroded),
        else the subject itself (``None``); ``"subject"``/``"none"``: the subject; anything else is
        loaded as a model and must share the subject's hidden size and tokenizer vocabulary.
        """
        spec = self.settings.probe_model
        if spec is None or spec.lower() in ("none", "subject"):
            return None
        if spec == "auto":
            spec = ALIGNED_PARENTS.get(subject.source.spec)
            if spec is None:
                return None
        loaded = self._load(resolve_model(spec))
        shape = {name: (getattr(m.model.config, "hidden_size", None), getattr(m.model.config, "num_hidden_layers", None),
                        len(m.tokenizer)) for name, m in (("probe", loaded), ("subject", subject))}
        if shape["probe"] != shape["subject"]:
            (pw, pd, _), (sw, sd, _) = shape["probe"], shape["subject"]
            raise UserError(f"--probe-model {spec!r} ({pd} layers of width {pw}) does not match {subject.source.spec!r} "
                            f"({sd} layers of width {sw}) or its tokenizer: probes must come from the aligned model "
                            "of the same family")
        if loaded.fingerprint == subject.fingerprint:
            raise UserError(f"--probe-model {spec!r} has the same weights as the subject {subject.source.spec!r}: "
                            "Q-realign would fit its probes on the eroded model itself; pass its aligned parent, or "
                            "--probe-model subject to do that on purpose")
        return loaded.model

    def _load(self, source: ModelSource) -> LoadedModel:
        return load_model(source, self.settings.device, self.settings.dtype, self.settings.trust_remote_code)

    def _quantize(self, spec: VariantSpec, subject: LoadedModel, consume_subject: bool,
                  artifact_dir: str | None) -> QuantizedVariant:
        """Quantize a copy of the subject (``fp`` returns the subject itself; ``consume_subject``:
        the subject in place) and describe it; see :meth:`make`."""
        from quantizers import QuantContext

        quantizer, needs, seed = self.quantizers[spec.name], self._needs(spec), self.settings.seed
        in_place = spec.method == "fp" or (consume_subject and not quantizer.uses_reference_model)
        calibration = None
        scratch = None
        if quantizer.writes_artifact and artifact_dir is None:
            scratch = artifact_dir = self._scratch_folder(spec.name)
        base_model, base_description, probe_model = self._frozen_models(needs, subject)
        ctx = QuantContext(tokenizer=subject.tokenizer, reference_model=None if in_place else subject.model,
                           base_model=base_model, device=next(subject.model.parameters()).device, seed=seed,
                           probe_model=probe_model, artifact_dir=artifact_dir,
                           refusal_token_ids=_refusal_token_ids(subject, self.settings.system_prompt)
                           if needs.prompts else None)
        del base_model, probe_model  # the context holds them: a quantizer's ctx.release can free them
        if needs.text:
            calibration = load_calibration(self.calib.spec(subject.source.kind, seed), subject.tokenizer, subject.model,
                                           cache_dir=self.settings.cache_dir)
            ctx.calibration_batches = calibration.batches
        prompt_meta = None
        if needs.prompts:
            ctx.calibration_prompts = load_calibration_prompts(self.calib.prompts)
            prompt_meta = {"source": self.calib.prompts, "ids": [r["id"] for r in ctx.calibration_prompts]}
        started = time.perf_counter()
        model = subject.model if in_place else copy.deepcopy(subject.model)
        model = quantizer.apply(model, spec.scheme, ctx)
        model.eval()
        seconds = time.perf_counter() - started
        shipped = None
        if quantizer.writes_artifact:
            _check_artifact_scheme(spec, quantization_of(artifact_dir)["scheme"])
        if scratch is not None:  # the variant is what the library saved, loaded as an artifact
            del model
            shipped = load_artifact(scratch, subject, device=self.settings.device, dtype=self.settings.dtype)
            model = shipped.model
        used = quantizer.metadata.get("calibration_prompts") if isinstance(quantizer.metadata, dict) else None
        if prompt_meta is not None and isinstance(used, dict) and used.get("ids"):
            prompt_meta["ids"] = list(used["ids"])  # the subset the method actually calibrated on
        record = {
            "method": spec.method, "scheme": spec.scheme.label, "options": quantizer.options_dict(),
            "metadata": quantizer.metadata, "calibration": calibration.describe() if calibration else None,
            "calibration_prompts": prompt_meta, "base": base_description,
            "seconds": round(seconds, 3),
            "source_model": {"spec": subject.source.spec, "fingerprint": subject.fingerprint},
        }
        if shipped is not None:
            record.update({k: shipped.record[k] for k in ("artifact", "provenance", "load_seconds")})
        return QuantizedVariant(model, seconds, record)

    def _frozen_models(self, needs: Needs, subject: LoadedModel) -> tuple[nn.Module | None, dict | None,
                                                                          nn.Module | None]:
        """``(base model, its description, probe model)`` for a variant with ``needs``. The last
        variant that needs the base (or the probe model) gets the maker's own reference, which the
        maker drops (keeping the base's description), so that the model is freed as soon as the
        quantizer has read it (``QuantContext.release``) instead of staying in memory through
        training; a variant made later that needs it again loads it again."""
        base, probe = BaseReference(None, None), None
        if needs.base:
            if self.base_model.model is None:
                self.base_model = self._load_base(subject)
            base = self.base_model
            self._uses_left["base"] -= 1
            if self._uses_left["base"] <= 0:
                self.base_model = BaseReference(None, base.description)
        if needs.prompts:
            if self._probe_handed_over:
                self.probe_model, self._probe_handed_over = self._load_probe_model(subject), False
            probe = self.probe_model
            self._uses_left["prompts"] -= 1
            if self._uses_left["prompts"] <= 0:
                self.probe_model, self._probe_handed_over = None, True
        return base.model, base.description, probe

    def _scratch_folder(self, name: str) -> str:
        """A folder for a method's saved product, removed when the process ends (the variant is
        loaded from it; a run that wants to keep it uses `safequant quantize --out`)."""
        import tempfile

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="safequant-artifacts-")
        return str(Path(self._scratch.name) / name)

    def _load_saved(self, path: str, subject: LoadedModel) -> QuantizedVariant:
        """A folder written by `safequant quantize`, on the subject's device and dtype."""
        from quantizers.artifact import load_variant

        first = next(subject.model.parameters())
        model, tokenizer, info = load_variant(path, device=first.device, dtype=first.dtype)
        _check_source(path, info, subject)
        record = {k: info.get(k) for k in ("method", "scheme", "options", "metadata", "calibration",
                                           "calibration_prompts", "base", "seconds", "source_model")}
        record["artifact"] = str(path)
        return QuantizedVariant(model, 0.0, record, tokenizer)


def _build(spec: VariantSpec, system_prompt: str | None) -> Quantizer:
    """The variant's quantizer, checked against its scheme. A method with a ``system_prompt``
    option gets the evaluation's unless the variant sets its own, so that calibration and
    evaluation see the same chat template (a pitfall of the released Q-realign code)."""
    from quantizers import QuantizerError, build_quantizer, get_quantizer

    options = spec.options
    try:
        if system_prompt is not None and "system_prompt" in get_quantizer(spec.method).option_names() \
                and "system_prompt" not in options:
            options = {**options, "system_prompt": system_prompt}
        quantizer = build_quantizer(spec.method, options)
        quantizer.check(spec.scheme)
    except QuantizerError as exc:
        raise UserError(f"variant {spec.name}: {exc}") from None
    return quantizer


def _refusal_token_ids(subject: LoadedModel, system_prompt: str | None) -> tuple[int, ...]:
    """The subject tokenizer's refusal first tokens (:mod:`harness.first_token`), for the logit-lens
    diagnostics of prompt-calibrated methods."""
    from harness.first_token import refusal_tokens

    return refusal_tokens(subject.tokenizer, system_prompt=system_prompt).first_token_ids


def _check_artifact_scheme(spec: VariantSpec, produced: str) -> None:
    """What a library saved must be the scheme the variant reports (a recipe file can say
    anything): never audit one scheme under another's name."""
    from dataclasses import replace

    from quantizers import QuantizerError, QuantScheme

    try:
        made = QuantScheme.parse(produced)
    except QuantizerError:
        made = None
    if made is None or made != replace(spec.scheme, skip=made.skip):
        raise UserError(f"variant {spec.name}: {spec.method} saved a {produced} checkpoint, not the variant's scheme "
                        f"{spec.scheme.label}: pass the scheme the recipe produces, e.g. :{produced}")


def _check_source(path: str, info: dict, subject: LoadedModel) -> None:
    """A saved variant must have been quantized from the subject (same fingerprint)."""
    source = info["source_model"]["fingerprint"]  # required by the variant.json schema: never empty
    if source != subject.fingerprint:
        raise UserError(f"saved variant {path} was quantized from a model with fingerprint {source}, but the "
                        f"subject {subject.source.spec!r} has {subject.fingerprint}: use it with --model "
                        f"{info.get('source_model', {}).get('spec', 'the model it was made from')}")


def _check_pair(subject: LoadedModel, base: LoadedModel) -> None:
    """FT and PT must share the architecture and vocabulary (AAQ's rule,
    :func:`quantizers.aaq.check_model_pair`), the width and the tokenizer's size."""
    from quantizers.aaq import check_model_pair

    check_model_pair(subject.model, base.model)
    s_width, b_width = subject.model.config.hidden_size, base.model.config.hidden_size
    if s_width != b_width or len(subject.tokenizer) != len(base.tokenizer):
        raise UserError(f"base model {base.source.spec!r} (hidden {b_width}, tokenizer {len(base.tokenizer)}) does not "
                        f"match {subject.source.spec!r} (hidden {s_width}, tokenizer {len(subject.tokenizer)}): give "
                        "the base model of the same family, or --base ablated")


def _hub_offline() -> bool:
    """True when the Hugging Face hub must not be reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_calibration_inputs(calib: CalibrationOptions, model_kind: str, seed: int, *, text: bool,
                             prompts: bool) -> None:
    """Before any model loads: the calibration text (``text``) and prompts (``prompts``) a run
    will need exist and can be read, and a hub dataset is not asked for while offline."""
    if text:
        spec = calib.spec(model_kind, seed)
        if spec.source.startswith("dataset:"):
            ds_id = spec.source.split(":")[1] if spec.source.count(":") >= 2 else ""
            if _hub_offline() and not Path(ds_id).is_dir():
                raise UserError(f"calibration text {spec.source!r} (--calib-text {calib.text}) needs the Hugging Face "
                                "hub, which is offline: pass --calib-text FILE with a local UTF-8 text, e.g. "
                                "WikiText-2 train saved as wiki.train.raw")
        elif spec.source.startswith(CHAT_PREFIX):  # answered by the model later: its prompts must load now
            load_calibration_prompts(spec.source[len(CHAT_PREFIX):] or "calibration")
        else:
            calibration_text(spec.source)
    if prompts:
        load_calibration_prompts(calib.prompts)


def calibration_overlap(calibration: Iterable[dict], evaluation: Iterable[tuple[str, str, str]]) -> list[str]:
    """``set/id`` of evaluation prompts that are also calibration prompts, by the one rule of
    :class:`common.prompts.PromptFootprint` (same normalised text, or same id).
    ``evaluation`` yields ``(set, id, prompt)``."""
    footprint = PromptFootprint.of(calibration)
    return [f"{name}/{rid}" for name, rid, prompt in evaluation if footprint.matches(rid, prompt)]
