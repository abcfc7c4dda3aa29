"""The judge registry: name -> class, specs parsed into typed options, entry-point plugins.

One pattern with the quantizers' registry (quantizers/base.py): built-in judges register
themselves with :func:`register_judge` when their module is imported; third-party packages publish
theirs through the ``safequant.judges`` entry-point group, loaded lazily the first time a name is
looked up or the list of names is asked for; options are a dataclass per judge, and a spec's
``KEY=VALUE`` strings are converted to the fields' types by the quantizers' own coercion.

A judge spec is ``NAME[:VALUE][,KEY=VALUE...]``: ``VALUE`` fills the judge's ``argument`` option
(``classifier:PATH`` sets ``model``), e.g. ``classifier:out/minilm,name=mine,batch_size=16`` or
``llama-guard-3:/models/lg3``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from common.plugins import load_entry_points, registered_or_plugin

from .base import Judge

log = logging.getLogger(__name__)

#: Entry-point group third-party judge packages register under (declared in pyproject.toml).
ENTRY_POINT_GROUP = "safequant.judges"
#: Modules of this package that hold built-in judges (imported lazily by the registry).
BUILTIN_MODULES: tuple[str, ...] = ("rules", "guard", "trained")

_REGISTRY: dict[str, type[Judge]] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_loaded = {"builtins": False, "plugins": False}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.+-]*$")


def _error(message: str) -> Exception:
    from harness.errors import UserError

    return UserError(message)


def register_judge(cls: type[Judge]) -> type[Judge]:
    """Class decorator: add a :class:`Judge` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise TypeError(f"register_judge expects a Judge subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _error(f"judge class {cls.__qualname__} has invalid name {name!r}: use lowercase letters, digits, "
                     "'_', '-', '.', starting with a letter")
    if not (dataclasses.is_dataclass(cls.Options) and isinstance(cls.Options, type)):
        raise _error(f"judge {name!r}: Options must be a dataclass type")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and (existing.__module__, existing.__qualname__) != (
            cls.__module__, cls.__qualname__):  # re-importing the same module is fine
        raise _error(f"judge name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f".{module}", __package__)


def _load_plugins(force: bool = False) -> None:
    """Import every ``safequant.judges`` entry point once. A broken plugin is logged and remembered
    (asking for it by name gives its error), never fatal for the others."""
    if _loaded["plugins"] and not force:
        return
    _loaded["plugins"] = True
    if force:
        _PLUGIN_ERRORS.clear()
    load_entry_points(ENTRY_POINT_GROUP, "judge", Judge, _REGISTRY, register_judge, _PLUGIN_ERRORS)

def judge_registry() -> dict[str, type[Judge]]:
    """Every judge class by name: built-in, registered and entry-point plugins."""
    _load_builtins()
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def reload_plugins() -> list[str]:
    """Re-scan the entry points (after installing a plugin in a running process); the names."""
    _load_plugins(force=True)
    return sorted(judge_registry())


def get_judge_class(name: str) -> type[Judge]:
    _load_builtins()
    found = registered_or_plugin(name, name.strip().lower(), "judge", _REGISTRY, _load_plugins, _PLUGIN_ERRORS, _error)
    if found is not None:
        return found
    takes = [f"{n}:{c.argument.upper()}" for n, c in sorted(_REGISTRY.items()) if c.argument]
    raise _error(f"unknown judge {name!r}: choose one of {', '.join(sorted(_REGISTRY))} "
                 f"(with an argument: {', '.join(takes)})")


def parse_judge_options(cls: type[Judge], options: Mapping[str, Any]) -> Any:
    """A ``cls.Options`` instance from a mapping; strings are converted to the fields' types with
    the quantizers' coercion (``"16"`` -> 16, ``"true"`` -> True). Unknown names and bad values
    are a UserError naming the valid options."""
    from quantizers.base import typed_options  # one option rule for every plugin

    return typed_options(cls.Options, options, what=f"judge {cls.name!r}", error=_error)

def parse_spec(spec: str) -> tuple[str, str | None, dict[str, Any]]:
    """``NAME[:VALUE][,KEY=VALUE...]`` -> (name, value or None, options)."""
    from harness.config import parse_options

    head, _, rest = spec.strip().partition(",")
    name, sep, value = head.partition(":")
    options = parse_options([rest], f"judge {spec!r}: option ") if rest.strip() else {}
    return name.strip(), (value.strip() if sep else None), options


def get_judge(spec: str, **options: Any) -> Judge:
    """A judge instance from a spec (``refusal-phrases``, ``classifier:PATH,name=X``, ...);
    keyword ``options`` are added to the spec's."""
    if not isinstance(spec, str) or not spec.strip():
        raise _error(f"judge {spec!r} must be a name such as refusal-minilm or classifier:PATH")
    name, value, opts = parse_spec(spec)
    cls = get_judge_class(name)
    if value is not None:
        if not cls.argument:
            raise _error(f"judge {name!r} takes no argument after ':' (got {value!r}); options go after a comma")
        opts[cls.argument] = value
    parsed = parse_judge_options(cls, {**opts, **options})
    return cls(**dataclasses.asdict(parsed))


def get_judges(specs: Sequence[str]) -> list[Judge]:
    """Several judges; names must be unique (a classifier takes its ``name=`` option)."""
    judges = [get_judge(s) for s in specs]
    seen = [j.name for j in judges]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise _error(f"judges {dupes} are given twice; give classifiers distinct names (classifier:PATH,name=X)")
    return judges


def judge_all(judges: Sequence[Judge], prompts: Sequence[str], responses: Sequence[str],
              metas: Sequence[Mapping[str, Any] | None] | None = None) -> list[dict[str, dict]]:
    """Run every judge on the same responses: one ``{judge_name: judgement dict}`` per response."""
    per_judge = {j.name: j.judge_many(prompts, responses, metas) for j in judges}
    return [{name: per_judge[name][i].to_dict() for name in per_judge} for i in range(len(responses))]
