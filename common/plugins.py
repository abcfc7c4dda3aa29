"""Entry-point plugins, loaded the same way for every registry (quantizers, judges).

A registry keeps its own name -> class table and its own rules for a valid class; this module
only walks an entry-point group once and records each broken plugin's error by name, so that
asking for that plugin later gives its error instead of "unknown name", and one broken package
never takes the others down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from importlib import metadata

__all__ = ["load_entry_points", "registered_or_plugin"]

log = logging.getLogger(__name__)


def load_entry_points(group: str, kind: str, base_class: type, registered: MutableMapping[str, type],
                      register: Callable[[type], object], errors: MutableMapping[str, str]) -> None:
    """Load every entry point of ``group`` whose name is not yet in ``registered``: its object must
    be a subclass of ``base_class`` whose ``name`` is the entry point's name, then ``register`` is
    called with it. A failure is logged and stored in ``errors`` under the plugin's name. ``kind``
    names the registry in messages (``quantizer``, ``judge``)."""
    try:
        eps = metadata.entry_points(group=group)
    except Exception as exc:  # pragma: no cover - broken environment metadata
        log.warning("could not list %s entry points: %s", group, exc)
        return
    for ep in eps:
        name = ep.name.lower()
        if name in registered:
            continue
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, base_class)):
                raise TypeError(f"{ep.value} is not a {base_class.__name__} subclass")
            if obj.name != name:
                raise ValueError(f"entry point name {ep.name!r} differs from the class's name {obj.name!r}")
            register(obj)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.warning("%s plugin %r (%s) failed to load: %s", kind, ep.name, ep.value, exc)


def registered_or_plugin(name: str, key: str, kind: str, registered: MutableMapping[str, type],
                         load_plugins: Callable[[], None], errors: MutableMapping[str, str],
                         error: Callable[[str], Exception]) -> type | None:
    """The class registered under ``key`` (entry points loaded only when it is not yet there), or
    None when no such name exists; a plugin that failed to load raises ``error`` with its failure."""
    if key not in registered:
        load_plugins()
    if key in registered:
        return registered[key]
    if key in errors:
        raise error(f"{kind} plugin {name!r} failed to load ({errors[key]}); fix or uninstall it")
    return None
