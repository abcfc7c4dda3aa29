"""Audit configuration: defaults, TOML files, CLI overrides, and variant specs.

A variant is written `[NAME=]METHOD[:SCHEME][:OPTION=VALUE,...]`, for example `fp`,
`rtn:w4a4`, `rtn:w4a4kv4-aclip0.9` or `strict=rtn:w4a16g128`, or `[NAME=]DIR` for a variant
folder saved by `safequant quantize` (evaluated as saved, without re-calibrating), or `[NAME=]FILE.gguf` /
`[NAME=]DIR` for a third-party artifact (harness/artifacts.py). Everything is validated here,
before a model is loaded or a directory is made, so bad input costs nothing.
"""

from __future__ import annotations

import copy
import math
import tomllib
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

from pydantic import AfterValidator, ConfigDict, ValidationError, create_model

from harness.calibration_data import CalibrationOptions
from harness.errors import UserError
from harness.set_limits import SetLimits, check_file_value
from reports.validation import describe_validation_error

if TYPE_CHECKING:  # the quantizers package imports torch: only when a variant is parsed
    from quantizers import QuantScheme

DEFAULT_VARIANTS = ("fp", "rtn:w8a8", "rtn:w4a16", "rtn:w4a4", "rtn:w4a4kv3", "rtn:w4a3")
DEFAULT_SETS = ("harmful", "benign", "overrefusal")
#: The first judge is the primary one (the rates in tables); the others are run on the same
#: responses so their agreement is measured. refusal-minilm agrees best with human labels
#: (docs/judges.md, XSTest v2 dev split, grouped CV).
DEFAULT_JUDGES = ("refusal-minilm", "refusal-phrases", "gcg-prefixes", "xstest-rule")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    method: str
    scheme: QuantScheme
    options: dict = field(default_factory=dict)
    artifact: str | None = None  # a saved variant folder: load it instead of quantizing

    def describe(self) -> dict:
        out = {"name": self.name, "method": self.method, "scheme": self.scheme.label, "options": self.options}
        if self.artifact:
            out["artifact"] = self.artifact
        return out


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(items, where: str, example: str = "") -> dict:
    """``KEY=VALUE`` items (each may hold several, comma-separated) as a dict of typed values;
    ``where`` names the input in the error, ``example`` is appended to it."""
    from common.keyvalue import key_value_items

    options: dict = {}
    for item, key, value in key_value_items(items, lambda bad: UserError(f"{where}{bad!r} must be written "
                                                                         f"KEY=VALUE{example}")):
        options[key] = _parse_value(value)
        if isinstance(options[key], float) and not math.isfinite(options[key]):
            raise UserError(f"{where}{item.strip()!r} is not a finite number: give a number{example}")
    return options


#: Longest variant name: it labels tables and columns and names a folder under work/.
MAX_NAME_LENGTH = 64


def check_variant_name(name: str, text: str) -> str:
    """A variant name is a label, never a path: refuse what could escape or confuse a folder name.

    ``text`` is the variant as the user wrote it, for the message. The name is also mapped to a
    safe folder name by the store (:func:`harness.store.work_folder_name`), so this is the first
    of two guards.
    """
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif ".." in name or set(name) == {"."}:
        problem = "contains '..' or is only dots"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        problem = "contains a control or invisible character"
    elif name != name.strip():
        problem = "starts or ends with whitespace"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if problem:
        raise UserError(f"variant {text!r}: the name {name!r} {problem}; a name is a label, not a path: use letters, "
                        "digits, '-', '_' or '.', e.g. strict=rtn:w4a4")
    return name


def parse_variant(text: str) -> VariantSpec:
    """Parse `[NAME=]METHOD[:SCHEME][:OPTION=VALUE,...]` into a validated VariantSpec."""
    from quantizers import QuantizerError, QuantScheme, build_quantizer
    from quantizers.artifact import is_variant_dir

    original = text.strip()
    name = None
    head = original.split(":", 1)[0]
    if "=" in head:
        name, original_rest = original.split("=", 1)
        name = name.strip()
    else:
        original_rest = original
    if name is not None:
        check_variant_name(name, text)
    if is_variant_dir(original_rest.strip()):
        return _saved_variant(name, original_rest.strip(), text)
    from harness.artifacts import artifact_format, parse_artifact_variant

    if artifact_format(original_rest.strip()):  # a GGUF file or a Hugging Face folder (harness/artifacts.py)
        return parse_artifact_variant(name, original_rest.strip(), text)
    parts = original_rest.split(":")
    method = parts[0].strip()
    if not method:
        raise UserError(f"variant {text!r} has no method: write e.g. rtn:w4a4 or fp")
    scheme_text = parts[1].strip() if len(parts) > 1 and parts[1].strip() else "fp"
    options = parse_options([":".join(parts[2:])], f"variant {text!r}: option ") if len(parts) > 2 else {}
    try:
        quantizer = build_quantizer(method, options)
        scheme = QuantScheme.parse(scheme_text)
        quantizer.check(scheme)
    except QuantizerError as exc:
        raise UserError(f"variant {text!r}: {exc}") from None
    if name is None:
        name = check_variant_name(method if scheme_text == "fp" else f"{method}-{scheme.label}", text)
    return VariantSpec(name, method, scheme, options)


def _saved_variant(name: str | None, folder: str, text: str) -> VariantSpec:
    """A VariantSpec for a folder written by `safequant quantize` (variant.json checked by its schema)."""
    from quantizers import QuantizerError, QuantScheme
    from quantizers.artifact import verify_variant

    try:
        info = verify_variant(folder)
        scheme = QuantScheme.parse(info["scheme"])
    except QuantizerError as exc:
        raise UserError(f"variant {folder!r}: {exc}") from None
    name = check_variant_name(name or Path(folder).resolve().name, text)
    return VariantSpec(name, info["method"], scheme, dict(info.get("options") or {}), artifact=str(Path(folder)))


@dataclass
class AuditConfig:
    """Everything an audit needs; field names are the TOML keys and the CLI flags."""

    model: str = "toy-chat"
    base: str | None = "auto"  # auto: the bundled model's unaligned base (harness.models.UNALIGNED_BASES), else none
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    prompt_sets: list[str] = field(default_factory=lambda: list(DEFAULT_SETS))
    #: prompts kept per set: N for every set, or a table {SET = N, "*" = N} (harness/set_limits.py)
    limit: int | dict[str, int] | None = None
    perplexity_text: str = "auto"
    ppl_window: int = 256
    ppl_stride: int = 256
    ppl_max_tokens: int = 16384
    out: str = "runs/audit"
    max_new_tokens: int = 48
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    judges: list[str] = field(default_factory=lambda: list(DEFAULT_JUDGES))
    data_dir: str | None = None
    first_token: bool = True
    probes: bool = True
    probe_layers: str = "all"
    bootstrap: int = 2000
    system_prompt: str | None = None
    trust_remote_code: bool = False
    report: bool = True
    #: written as the flat keys ``calib_text``, ``calib_samples``, ... in files, flags and the summary
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    ablate_layer: int | None = None
    probe_model: str = "auto"
    #: head-to-head comparisons `A=B` (A against B); the default pairs are added to these
    pairs: list[str] = field(default_factory=list)
    #: generation backend: `hf` or `vllm` for every variant, `NAME=BACKEND` for one (harness/backends.py)
    backend: list[str] = field(default_factory=lambda: ["hf"])
    #: passed through to vLLM's engine (--backend vllm only)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5

    #: Results cache shared by run directories: "auto" ($SAFEQUANT_CACHE_DIR, else
    #: $XDG_CACHE_HOME/safequant, else ~/.cache/safequant), a folder, or "none" to disable.
    cache_dir: str = "auto"

    def cache_path(self) -> Path | None:
        """The shared cache folder this config uses, or None when caching across runs is off."""
        from harness.store import resolve_cache_dir

        return resolve_cache_dir(self.cache_dir)

    def settings(self) -> dict:
        """The config as its file keys: every field, the calibration options flattened to their
        ``calib_*`` keys in the place of ``calibration`` (what the summary records as ``config``)."""
        out: dict = {}
        for f in fields(self):
            if f.name == "calibration":
                out.update(self.calibration.as_keys())
            else:
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    @classmethod
    def from_settings(cls, values: dict) -> "AuditConfig":
        """The config from file keys (:meth:`settings`'s spelling); absent keys keep their defaults."""
        own = {k: v for k, v in values.items() if k not in CalibrationOptions.KEYS}
        return cls(**own, calibration=CalibrationOptions.from_keys(values))

    @classmethod
    def from_toml(cls, path: str) -> "AuditConfig":
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path!r} not found: pass an existing TOML file to --config")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path!r} is not valid TOML ({exc}): fix the syntax") from None
        data = data.get("audit", data)
        if not isinstance(data, dict):
            raise UserError(f"config file {path!r}: [audit] must be a table of settings")
        known = set(_FILE_KEYS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config file {path!r} has unknown keys {unknown}: valid keys are {sorted(known)}")
        # A list setting written as one string (variants = "fp") is that one item, not its letters.
        data = {k: [v] if isinstance(v, str) and k in _LIST_KEYS else v for k, v in data.items()}
        try:
            _CONFIG_SCHEMA.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"config file {path!r}: {describe_validation_error(exc)}; fix that key") from None
        return cls.from_settings(data)

    def with_overrides(self, overrides: dict) -> "AuditConfig":
        """This config with the given file keys replaced (None: keep), e.g. from CLI flags."""
        values = self.settings()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return AuditConfig.from_settings(values)

    def variant_specs(self) -> list[VariantSpec]:
        specs = [parse_variant(v) for v in self.variants]
        if not specs:
            raise UserError("no variants given: pass at least one, e.g. --variants fp,rtn:w4a4")
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"variant names {dupes} are used twice: name them, e.g. a=rtn:w4a4 b=rtn:w4a4:...")
        if specs[0].method != "fp":
            # Ratios and flips are measured against the full-precision model: always evaluate it first.
            specs.insert(0, parse_variant("fp"))
        return specs

    def variant_pairs(self, specs: list[VariantSpec]) -> list[tuple[str, str]]:
        """The ``--pairs A=B`` entries as ``(A, B)`` name pairs, checked against the variants."""
        names = [s.name for s in specs]
        pairs = []
        for text in ([self.pairs] if isinstance(self.pairs, str) else self.pairs):
            a, sep, b = str(text).partition("=")
            a, b = a.strip(), b.strip()
            if not sep or a not in names or b not in names or a == b:
                raise UserError(f"pair {text!r} must be A=B with two different variant names of this audit "
                                f"(variants: {', '.join(names)}), e.g. --pairs aaq-w4a4kv4=ost-w4a4kv4")
            pairs.append((a, b))
        return pairs

    def validate(self) -> None:
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size),
                            ("ppl_window", self.ppl_window), ("ppl_stride", self.ppl_stride)):
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        SetLimits.parse(self.limit)  # the syntax now; the set names once the sets are loaded
        if not self.judges:
            raise UserError("no judges given: pass e.g. --judges refusal-phrases")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 100:
            raise UserError(f"bootstrap must be an integer >= 100, got {self.bootstrap!r}")
        if not self.prompt_sets:
            raise UserError("no prompt sets given: pass e.g. --prompt-sets harmful,benign,overrefusal")
        if self.ppl_max_tokens is not None and (not isinstance(self.ppl_max_tokens, int) or self.ppl_max_tokens < 2):
            raise UserError(f"ppl_max_tokens must be an integer >= 2, got {self.ppl_max_tokens!r}")
        from probes.capture import parse_layers
        from probes.errors import ProbeError

        try:  # the syntax now; the range once the model's depth is known (before any work)
            parse_layers(self.probe_layers, 10**6)
        except ProbeError as exc:
            raise UserError(f"--probe-layers {self.probe_layers!r}: {exc}") from None


def _file_key_types() -> dict:
    """Each file key's type: the dataclass's own fields, the calibration options under their keys."""
    own = {k: v for k, v in get_type_hints(AuditConfig).items() if k != "calibration"}
    own["limit"] = Annotated[Any, AfterValidator(check_file_value)]  # int | table: one message, not a union's two
    calib = get_type_hints(CalibrationOptions)
    return {**own, **{key: calib[name] for key, name in CalibrationOptions.KEYS.items()}}


_FILE_KEYS = _file_key_types()
#: The TOML file's schema: the file keys and their types, strict (a string is never a number).
_CONFIG_SCHEMA = create_model("AuditConfigFile", __config__=ConfigDict(strict=True, extra="forbid"),
                              **{name: (hint, None) for name, hint in _FILE_KEYS.items()})
_LIST_KEYS = {f.name for f in fields(AuditConfig) if str(f.type).startswith("list[")}
