"""How many prompts of each set a run keeps: ``--limit N``, ``--limit SET=N ...``, or both.

The real-model tables need e.g. "all of harmful, benign and over-refusal, the first 104 of
AdvBench's 520", which one number for every set cannot say. One grammar, for flags and files:

* a limit is a table from set name to N, where the key :data:`EVERY_SET` (``*``) is the limit of
  every set without an entry of its own; a bare ``N`` is short for ``{"*": N}``;
* on the command line each item is ``N`` or ``SET=N`` (``--limit 50 advbench=104``); in a TOML file
  ``limit = 50`` or ``limit = {advbench = 104}`` (``{"*" = 50, advbench = 104}`` for both);
* SET is a set's name as the run names it (``advbench``, ``xstest-safe`` for a group's member,
  NAME of a ``NAME=PATH`` file): an entry for a set the run does not have is an error, not a no-op,
  since a typo would otherwise silently audit the whole set.

A limit keeps the *first* N records, so two runs with different limits share their common prefix
prompt by prompt (the run store keys every cached row by its prompt's text, not by the limit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harness.errors import UserError

if TYPE_CHECKING:
    from harness.prompts import PromptSet

__all__ = ["EVERY_SET", "SetLimits", "check_file_value"]

#: The key of the limit that applies to every set without an entry of its own.
EVERY_SET = "*"
_EXAMPLE = "e.g. --limit 50 advbench=104, or limit = {advbench = 104} in a config file"
_DIGITS = re.compile(r"\s*\d+\s*")


def check_file_value(value: Any) -> Any:
    """The type check of a config file's ``limit`` (a validator of its strict schema): an integer or
    a table of integers, never a string; the values themselves are checked by :meth:`SetLimits.parse`."""
    if value is None or type(value) is int:
        return value
    if isinstance(value, dict) and all(isinstance(k, str) and type(n) is int for k, n in value.items()):
        return value
    raise ValueError('must be an integer or a table of integers by set name, e.g. limit = 50, '
                     'limit = {advbench = 104} or limit = {"*" = 50, advbench = 104}')


def _count(value: Any, item: str) -> int:
    """A positive integer from an int or its decimal spelling; anything else is one clear error."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"limit {item!r}: N must be a positive integer ({_EXAMPLE})")
    return value


@dataclass(frozen=True)
class SetLimits:
    """The parsed limit: ``default`` for every set without an entry in ``per_set`` (None: all)."""

    default: int | None = None
    per_set: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: SetLimits | int | str | Sequence[str] | Mapping[str, Any] | None) -> SetLimits:
        """Read any spelling of a limit: None (no limit), an int, a mapping (the TOML table), or the
        command line's items (a string or a list of ``N`` / ``SET=N``). Raises :class:`UserError`."""
        if isinstance(value, SetLimits):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            pairs = [(str(k).strip(), v, f"{k}={v}") for k, v in value.items()]
        elif isinstance(value, (int, str)):
            pairs = [cls._item(value)]
        elif isinstance(value, Sequence):
            pairs = [cls._item(v) for v in value]
        else:
            raise UserError(f"limit {value!r} must be N or a table of SET = N ({_EXAMPLE})")
        default, per_set = None, {}
        for name, raw, item in pairs:
            n = _count(raw, item)
            if not name:
                raise UserError(f"limit {item!r}: the set name is empty ({_EXAMPLE})")
            if name == EVERY_SET:
                if default is not None:
                    raise UserError(f"limit {item!r}: a limit for every set is given twice ({default} and {n}); "
                                    "give one bare N")
                default = n
            elif name in per_set:
                raise UserError(f"limit {item!r}: set {name!r} is given twice ({per_set[name]} and {n}); give it once")
            else:
                per_set[name] = n
        return cls(default, per_set)

    @staticmethod
    def _item(item: Any) -> tuple[str, Any, str]:
        """One command-line item as (set name or ``*``, N as written, the item for messages)."""
        if isinstance(item, str) and "=" in item:
            name, _, n = item.rpartition("=")
            return name.strip(), n, item
        return EVERY_SET, item, str(item)

    def setting(self) -> int | dict[str, int] | None:
        """The limit as the config records it (the ``limit`` key of a file and of summary.json): an
        int when only a limit for every set is given, else the table."""
        if not self.per_set:
            return self.default
        return {**({EVERY_SET: self.default} if self.default is not None else {}), **self.per_set}

    def for_set(self, name: str) -> int | None:
        """The number of prompts set ``name`` keeps (None: all of them)."""
        return self.per_set.get(name, self.default)

    def apply(self, sets: Sequence[PromptSet]) -> list[PromptSet]:
        """Each set cut to its first N records; an entry naming a set not in ``sets`` is an error
        that names it and lists the run's sets."""
        names = [ps.name for ps in sets]
        unknown = [name for name in self.per_set if name not in names]
        if unknown:
            raise UserError(f"limit {unknown[0] + '=' + str(self.per_set[unknown[0]])!r}: this run has no prompt set "
                            f"{unknown[0]!r}; its sets are {', '.join(names)} (name one of them, as the run names it)")
        out = []
        for ps in sets:
            n = self.for_set(ps.name)
            out.append(ps if n is None or n >= len(ps.records) else replace(ps, records=ps.records[:n]))
        return out
