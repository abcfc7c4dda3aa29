"""Quantizer plugin base class, the context it runs in, and the name -> class registry.

A quantizer is a subclass of :class:`Quantizer` with a unique ``name``, a dataclass ``Options``
type, and a :meth:`Quantizer.quantize` method. Built-in quantizers register themselves with the
:func:`register_quantizer` decorator when their module is imported; third-party packages publish
theirs through the ``safequant.quantizers`` entry-point group, loaded lazily the first time a name
is looked up or the list of names is asked for (see docs/quantizers.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import random
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

from common.plugins import load_entry_points, registered_or_plugin

from .errors import QuantizerError  # re-exported: `from quantizers.base import QuantizerError` keeps working

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .scheme import QuantScheme

__all__ = [
    "QuantizerError",
    "QuantContext",
    "Quantizer",
    "NoOptions",
    "register_quantizer",
    "get_quantizer",
    "build_quantizer",
    "available_quantizers",
    "quantizer_descriptions",
    "reload_plugins",
    "ENTRY_POINT_GROUP",
    "BUILTIN_MODULES",
]

log = logging.getLogger(__name__)

#: Entry-point group third-party quantizer packages register under.
ENTRY_POINT_GROUP = "safequant.quantizers"

#: Modules of this package that hold built-in quantizers (imported lazily by the registry).
#: Add the module of every new built-in method here.
BUILTIN_MODULES: tuple[str, ...] = ("fp", "rtn", "gptq", "qrealign", "smoothquant", "quarot", "ost", "aaq",
                                     "llmcompressor_plugin")


ProgressCallback = Callable[[str, int, int], None]


@dataclass
class QuantContext:
    """Everything a quantizer may need besides the model and the scheme.

    ``calibration_batches``: token batches for calibration-based methods, each a LongTensor of
    input ids ``[batch, seq]`` or a dict of model inputs (``input_ids``, ``attention_mask``), or
    ``None`` for data-free methods. ``reference_model``: the full-precision model (the subject
    before quantization; frozen). ``base_model``: the unaligned pre-trained model of the same family
    (AAQ's push target) or ``None``. ``calibration_prompts``: labelled prompt records for methods
    that calibrate on prompts rather than text (Q-realign), each a dict with ``id``, ``prompt``,
    ``label`` (``"harmful"`` or ``"benign"``) and ``source``; the harness keeps them disjoint from
    the evaluation prompts. ``probe_model``: the aligned model probes are fitted on when a method
    needs probes from a model other than the subject (``None``: use ``reference_model``).
    ``refusal_token_ids``: token ids a refusal opens with in this tokenizer (the harness derives
    them from its documented refusal openings); Q-realign's logit-lens diagnostics read them.
    ``progress(stage, done, total)``, if given, is handed to the loops that report how work
    advances (``run_calibration``, ``quantize_linear_layers``, GPTQ's layer loop).
    ``artifact_dir``: the folder a quantizer with ``writes_artifact`` saves its product to.
    """

    tokenizer: Any = None
    calibration_batches: Sequence[Any] | None = None
    reference_model: nn.Module | None = None
    base_model: nn.Module | None = None
    calibration_prompts: Sequence[Mapping[str, Any]] | None = None
    probe_model: nn.Module | None = None
    refusal_token_ids: Sequence[int] | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    progress: ProgressCallback | None = None
    artifact_dir: str | None = None

    def release(self, *names: str) -> None:
        """Drop this context's references to the frozen models ``names`` (``reference_model``,
        ``base_model``, ``probe_model``) once a quantizer has read all it needs from them (OST/AAQ:
        the cached targets; Q-realign: probes and parent targets), so that a model nobody else
        holds is freed before training starts. A caller that still needs one keeps its own
        reference (the harness hands its own over only for the last variant that needs it)."""
        for name in names:
            if name not in ("reference_model", "base_model", "probe_model"):
                raise ValueError(f"QuantContext.release: {name!r} is not a frozen model field")
            setattr(self, name, None)

    def seed_everything(self) -> None:
        """Seed Python's and torch's generators with ``seed``."""
        import torch

        random.seed(self.seed)
        torch.manual_seed(self.seed)


@dataclass(frozen=True)
class NoOptions:
    """Options type of a quantizer that has none."""


class Quantizer:
    """Base class of every quantization method.

    Subclasses set ``name`` (lowercase, unique), optionally ``description``, ``Options`` (a
    dataclass whose fields all have defaults), ``requires_calibration`` and ``needs_base_model``;
    they implement
    :meth:`quantize` and may override :meth:`check` to reject schemes they cannot produce.

    Callers use :meth:`apply` (checks the scheme, seeds, then calls :meth:`quantize`).

    ``metadata`` is a JSON-ready dict that :meth:`quantize` fills with what a reader of the saved
    variant needs to know (loss curves from :class:`~quantizers.calibration.CalibrationLog`,
    early stops, online transforms used); it is reset by :meth:`apply` and written to
    ``variant.json`` and the run's summary.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires_calibration: ClassVar[bool] = False
    #: True when the method needs ``ctx.base_model`` (the unaligned pre-trained model), e.g. AAQ.
    needs_base_model: ClassVar[bool] = False
    #: True when the method calibrates on labelled prompts (``ctx.calibration_prompts``), e.g.
    #: Q-realign; the harness then keeps them disjoint from the evaluation prompts.
    uses_calibration_prompts: ClassVar[bool] = False
    #: True when the quantized model transforms activations at inference time (online Hadamards,
    #: post-RoPE rotations) for the schemes that quantize linears: a runtime that only loads weights
    #: (an export, ``--backend vllm``) would run another model than the one audited.
    online_transforms: ClassVar[bool] = False
    #: True when :meth:`quantize` reads ``ctx.reference_model`` (the FP subject) after it has
    #: started changing the model: the harness then never quantizes the subject in place. A method
    #: that reads the FP model only before its first change (OST/AAQ cache their targets, Q-realign
    #: fits its probes first) leaves it False and reads the model itself when no reference is given.
    uses_reference_model: ClassVar[bool] = False
    #: True when the method's product is a Hugging Face folder it saves to ``ctx.artifact_dir``
    #: (a third-party library's own format, e.g. llm-compressor's compressed-tensors): the harness
    #: loads that folder back as the variant, so the audit measures what was saved.
    writes_artifact: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = self.parse_options(options)
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ options
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def parse_options(cls, options: Any = None) -> Any:
        """An ``Options`` instance from ``None``, an instance, or a mapping of field names to values.

        Strings are converted to the field's type (``"0.9"`` -> 0.9, ``"true"`` -> True) so CLI
        ``key=value`` pairs work. Unknown names, wrong types and values the ``Options``
        ``__post_init__`` rejects (with ``ValueError``) raise :class:`QuantizerError`.
        """
        opt_cls = cls.Options
        if options is None:
            options = {}
        if isinstance(options, opt_cls):
            return options
        if not isinstance(options, Mapping):
            raise QuantizerError(
                f"options for quantizer {cls.name!r} must be a mapping of names to values, "
                f"got {type(options).__name__}"
            )
        return typed_options(opt_cls, options, what=f"quantizer {cls.name!r}", error=QuantizerError)

    def needs_calibration_text(self) -> bool:
        """Whether this quantizer, with its options, calibrates on text windows: the harness loads
        them only then. Default: the class flag ``requires_calibration``; a method whose options
        can ask for data it otherwise does without (QuaRot's ``weights=gptq``) says so here."""
        return self.requires_calibration

    def options_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for variant.json)."""
        return dataclasses.asdict(self.options)

    # ------------------------------------------------------------------ schemes
    def check(self, scheme: QuantScheme) -> None:
        """Raise :class:`QuantizerError` if this quantizer cannot produce ``scheme``. Default: any."""

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`QuantizerError` if this quantizer's inputs do not fit ``model`` (the harness
        calls it once the subject loads, before any variant is made or any file written). Default: any."""

    def supports(self, scheme: QuantScheme) -> bool:
        try:
            self.check(scheme)
        except QuantizerError:
            return False
        return True

    # ------------------------------------------------------------------ running
    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        """Quantize ``model`` (in place where possible) and return the quantized model."""
        raise NotImplementedError(f"quantizer {self.name!r} does not implement quantize()")

    def apply(self, model: nn.Module, scheme: QuantScheme | str, ctx: QuantContext | None = None) -> nn.Module:
        """Check the scheme, seed, and run :meth:`quantize`. The entry point callers should use."""
        from .scheme import QuantScheme

        scheme = QuantScheme.coerce(scheme)
        ctx = ctx if ctx is not None else QuantContext()
        self.check(scheme)
        if self.requires_calibration and not ctx.calibration_batches:
            raise QuantizerError(f"quantizer {self.name!r} needs calibration data; none was given")
        if self.uses_calibration_prompts and not ctx.calibration_prompts:
            raise QuantizerError(f"quantizer {self.name!r} needs labelled calibration prompts; none were given")
        if self.needs_base_model and ctx.base_model is None:
            raise QuantizerError(
                f"quantizer {self.name!r} needs the unaligned base model; give one (base model in the config)"
            )
        ctx.seed_everything()
        self.metadata = {}
        log.info("quantizing with %s (%s)", self.name, scheme.label)
        if not scheme.fp_prefix:
            return self.quantize(model, scheme, ctx)
        from .fp_prefix import enable_fp_prefix

        enable_fp_prefix(model, scheme.fp_prefix)  # before: learned methods train against it
        quantized = self.quantize(model, scheme, ctx)
        enable_fp_prefix(quantized, scheme.fp_prefix)
        return quantized

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"


# ---------------------------------------------------------------------- option coercion
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or "does not match the option's type")
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("must be true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ValueError("must be an integer")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError("must be a string")
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"must be of type {hint.__name__}")
    return value


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Quantizer]] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_builtins_loaded = False
_plugins_loaded = False
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.+-]*$")


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: add a :class:`Quantizer` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"register_quantizer expects a Quantizer subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise QuantizerError(
            f"quantizer class {cls.__qualname__} has invalid name {name!r}: "
            "use lowercase letters, digits, '_', '-', '.', starting with a letter"
        )
    if not (dataclasses.is_dataclass(cls.Options) and isinstance(cls.Options, type)):
        raise QuantizerError(f"quantizer {name!r}: Options must be a dataclass type")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        same = existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__
        if not same:  # re-import of the same module (e.g. importlib.reload) is fine
            raise QuantizerError(
                f"quantizer name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}"
            )
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(f".{module}", __package__)


def _load_plugins(force: bool = False) -> None:
    """Import every ``safequant.quantizers`` entry point once (again with ``force``, e.g. after
    installing a plugin in a running process). A broken plugin is logged and remembered (so asking
    for it by name gives its error), never fatal for the others."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    if force:
        _PLUGIN_ERRORS.clear()
    _plugins_loaded = True
    load_entry_points(ENTRY_POINT_GROUP, "quantizer", Quantizer, _REGISTRY, register_quantizer, _PLUGIN_ERRORS)

def reload_plugins() -> list[str]:
    """Re-scan the ``safequant.quantizers`` entry points (after installing a plugin in a running
    process); returns the available names."""
    _load_plugins(force=True)
    return available_quantizers()


def available_quantizers() -> list[str]:
    """Sorted names of all quantizers: built-in, registered, and entry-point plugins."""
    _load_builtins()
    _load_plugins()
    return sorted(_REGISTRY)


def quantizer_descriptions() -> dict[str, str]:
    """Name -> description of every quantizer, without importing a module that is not yet loaded
    (the methods import torch; `safequant list` must not): a built-in's ``name`` and
    ``description`` are read from its module's source, a plugin not yet loaded is described by
    its entry point."""
    found: dict[str, str] = {}
    for module in BUILTIN_MODULES:
        found.update(_declared_quantizers(f"{__package__}.{module}"))
    try:
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # pragma: no cover - broken environment metadata
        eps = []
    for ep in eps:
        found.setdefault(ep.name.lower(), f"plugin ({ep.value})")
    found.update({name: cls.description for name, cls in _REGISTRY.items()})  # loaded: the class itself
    return dict(sorted(found.items()))


def _declared_quantizers(module: str) -> dict[str, str]:
    """``name -> description`` of the ``@register_quantizer`` classes in a module's source, read
    with :mod:`ast` (nothing is imported); only literal class attributes count."""
    import ast
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec(module)
    if spec is None or not spec.origin:
        return {}
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef)
                and any(isinstance(d, ast.Name) and d.id == "register_quantizer" for d in node.decorator_list)):
            continue
        attrs = {t.id: stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)
                 for t in stmt.targets if isinstance(t, ast.Name)}
        try:
            name = ast.literal_eval(attrs["name"])
            found[name] = ast.literal_eval(attrs["description"]) if "description" in attrs else ""
        except (KeyError, ValueError):
            continue
    return found


def typed_options(opt_cls: type, options: Mapping[str, Any], *, what: str,
                  error: Callable[[str], Exception]) -> Any:
    """An ``opt_cls`` dataclass instance from a mapping, for any plugin (quantizers, judges):
    unknown names are refused with the valid ones, strings are converted to the fields' types
    (``"0.9"`` -> 0.9, ``"true"`` -> True), and a rejected value raises ``error`` naming ``what``."""
    valid = [f.name for f in dataclasses.fields(opt_cls)]
    unknown = sorted(str(k) for k in options if k not in valid)
    if unknown:
        shown = ", ".join(valid) if valid else "none"
        raise error(f"unknown option(s) {', '.join(unknown)} for {what}; valid options: {shown}")
    try:
        hints = typing.get_type_hints(opt_cls)
    except Exception:  # unresolvable string annotations (class defined in a function): no coercion
        hints = {}
    values = {}
    for key, value in options.items():
        try:
            values[key] = _coerce(value, hints.get(key, Any))
        except (TypeError, ValueError) as exc:
            raise error(f"option {key}={value!r} for {what}: {exc}") from None
    try:
        return opt_cls(**values)
    except QuantizerError:
        raise
    except (TypeError, ValueError) as exc:
        raise error(f"invalid options for {what}: {exc}") from None


def get_quantizer(name: str) -> type[Quantizer]:
    """The quantizer class registered under ``name`` (case-insensitive)."""
    _load_builtins()
    key = name.strip().lower() if isinstance(name, str) else name
    found = registered_or_plugin(name, key, "quantizer", _REGISTRY, _load_plugins, _PLUGIN_ERRORS, QuantizerError)
    if found is not None:
        return found
    known = ", ".join(sorted(_REGISTRY)) or "none"
    raise QuantizerError(f"unknown quantizer {name!r}; available quantizers: {known}")


def build_quantizer(name: str, options: Mapping[str, Any] | None = None) -> Quantizer:
    """``get_quantizer(name)(options)``: an instance with validated options."""
    return get_quantizer(name)(options)
