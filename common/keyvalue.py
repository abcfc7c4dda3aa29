"""``KEY=VALUE`` items, the syntax of every option string on the command line.

One splitter, so that ``--option``, ``--columns`` and column mappings agree on commas, blanks and
the first ``=``; each caller keeps its own message for a bad item (it knows what the item is for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["KeyValueError", "key_value_items"]


class KeyValueError(ValueError):
    """An item without ``=``: ``item`` is the item as written."""

    def __init__(self, item: str) -> None:
        super().__init__(f"{item!r} must be written KEY=VALUE")
        self.item = item


def key_value_items(items: str | Iterable[str],
                    error: Callable[[str], Exception] | None = None) -> list[tuple[str, str, str]]:
    """``(item, key, value)`` for every comma-separated item of ``items`` (one string or several),
    key and value stripped, blank items skipped; the value may hold further ``=``. An item without
    ``=`` raises ``error(item)`` (the caller's message), else :class:`KeyValueError`."""
    texts = [items] if isinstance(items, str) else list(items)
    out = []
    for item in ",".join(texts).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise (error or KeyValueError)(item)
        out.append((item, key.strip(), value.strip()))
    return out
