"""Audit configuration: defaults, TOML files, CLI overrides, and variant specs.

A variant is written `[NAME=]METHOD[:SCHEME][:OPTION=VALUE,...]`, for example `fp`,
`rtn:w4a4`, `rtn:w4a4kv4-aclip0.9` or `strict=rtn:w4a16g128`, or `[NAME=]DIR` for a variant
folder saved by `safequant quantize` (evaluated as saved, without re-calibrating). Everything is validated here,
before a model is loaded or a directory is made, so bad input costs nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from harness.errors import UserError
from quantizers import QuantizerError, QuantScheme, build_quantizer
from quantizers.artifact import is_variant_dir, read_variant_info

DEFAULT_VARIANTS = ("fp", "rtn:w8a8", "rtn:w4a16", "rtn:w4a4", "rtn:w4a4kv3", "rtn:w4a3")
DEFAULT_SETS = ("harmful", "benign", "overrefusal")
#: The first judge is the primary one (the rates in tables); the others are run on the same
#: responses so their agreement is measured.
DEFAULT_JUDGES = ("refusal-phrases", "gcg-prefixes", "xstest-rule")


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
    options: dict = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"{where}{item!r} must be written KEY=VALUE{example}")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value.strip())
    return options


def parse_variant(text: str) -> VariantSpec:
    """Parse `[NAME=]METHOD[:SCHEME][:OPTION=VALUE,...]` into a validated VariantSpec."""
    original = text.strip()
    name = None
    head = original.split(":", 1)[0]
    if "=" in head:
        name, original_rest = original.split("=", 1)
        name = name.strip()
    else:
        original_rest = original
    if is_variant_dir(original_rest.strip()):
        return _saved_variant(name, original_rest.strip())
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
        name = method if scheme_text == "fp" else f"{method}-{scheme.label}"
    return VariantSpec(name, method, scheme, options)


def _saved_variant(name: str | None, folder: str) -> VariantSpec:
    """A VariantSpec for a folder written by `safequant quantize`."""
    try:
        info = read_variant_info(folder)
        scheme = QuantScheme.parse(info["scheme"])
    except (QuantizerError, KeyError) as exc:
        raise UserError(f"variant {folder!r}: {exc}") from None
    return VariantSpec(name or Path(folder).name, info["method"], scheme, dict(info.get("options") or {}),
                       artifact=str(Path(folder)))


@dataclass
class AuditConfig:
    """Everything an audit needs; field names are the TOML keys and the CLI flags."""

    model: str = "toy-chat"
    base: str | None = "auto"  # auto: the bundled model's unaligned base (harness.models.UNALIGNED_BASES), else none
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    prompt_sets: list[str] = field(default_factory=lambda: list(DEFAULT_SETS))
    limit: int | None = None
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
    calib_text: str = "auto"
    calib_samples: int = 32
    calib_len: int = 256
    calib_batch: int = 4
    calib_span: str = "0:1"
    calib_prompts: str = "calibration"
    allow_overlap: bool = False
    ablate_layer: int | None = None
    probe_model: str = "auto"

    def calibration(self):
        """The calibration settings as :class:`harness.quantize.CalibrationOptions`."""
        from harness.quantize import CalibrationOptions

        return CalibrationOptions(self.calib_text, self.calib_samples, self.calib_len, self.calib_batch,
                                  self.calib_span, self.calib_prompts, self.allow_overlap)

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config file {path!r} has unknown keys {unknown}: valid keys are {sorted(known)}")
        return cls(**data)

    def with_overrides(self, overrides: dict) -> "AuditConfig":
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return AuditConfig(**values)

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

    def validate(self) -> None:
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size),
                            ("ppl_window", self.ppl_window), ("ppl_stride", self.ppl_stride)):
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise UserError(f"limit must be a positive integer, got {self.limit!r}")
        if not self.judges:
            raise UserError("no judges given: pass e.g. --judges refusal-phrases")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 100:
            raise UserError(f"bootstrap must be an integer >= 100, got {self.bootstrap!r}")
        if not self.prompt_sets:
            raise UserError("no prompt sets given: pass e.g. --prompt-sets harmful,benign,overrefusal")
