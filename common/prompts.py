"""Prompt rules shared by generation, calibration and the probes: how a prompt is rendered for the
model, and when two prompts count as the same.

One chat rendering (:func:`chat_prompt`) is used wherever a prompt meets a model (generation,
first-token scores, probe capture, Q-realign's calibration), so a variant is calibrated on exactly
the text it is evaluated on. One equality rule (:func:`normalise_prompt`, :class:`PromptFootprint`)
decides whether an evaluation prompt was also a calibration prompt, for the check before a variant
is made and for the record a saved Q-realign variant keeps.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptFootprint", "chat_prompt", "normalise_prompt", "prompt_hash"]

_WORD = re.compile(r"[^\W_]+")


def chat_prompt(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt wrapped in the model's chat template, ready for the assistant's turn.

    Models without a chat template (base models) get the raw prompt, so a base model can still be
    audited as a completion model. An empty ``system_prompt`` means none.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def normalise_prompt(text: str) -> str:
    """Lower case, apostrophes dropped, other punctuation and white space folded: the form in
    which two prompts count as the same (``"Kill it!" == "kill  it"``). Letters and digits of
    every script are kept (an all-Cyrillic prompt does not fold to nothing)."""
    text = str(text).lower().replace("'", "").replace("\u2019", "")
    return " ".join(_WORD.findall(text))


def prompt_hash(text: str) -> str:
    """A short stable hash of the normalised prompt (stored instead of the text in metadata)."""
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()[:16]


def _field(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)


@dataclass(frozen=True)
class PromptFootprint:
    """What a set of calibration prompts leaves to compare against: hashes of the normalised
    texts, the ids and the sources. A prompt overlaps it when its normalised text is one of them
    (an empty text never matches), or when its id is one of them and the sources allow it (a prompt
    without a source, or a footprint without sources, matches any)."""

    hashes: frozenset[str]
    ids: frozenset[str]
    sources: frozenset[str] = frozenset()

    @classmethod
    def of(cls, records: Iterable[Any]) -> PromptFootprint:
        """The footprint of prompt records (dicts or objects with ``id``, ``prompt``, ``source``)."""
        records = list(records)
        return cls(
            hashes=frozenset(prompt_hash(p) for p in (_field(r, "prompt") for r in records)
                             if isinstance(p, str) and normalise_prompt(p)),
            ids=frozenset(str(_field(r, "id")) for r in records if _field(r, "id") is not None),
            sources=frozenset(str(s) for s in (_field(r, "source") for r in records) if s),
        )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> PromptFootprint:
        """The footprint a Q-realign variant records (``metadata["calibration_prompts"]``:
        ``hashes``, ``ids``, ``probe_ids``, ``source`` joined by ``+``)."""
        return cls(
            hashes=frozenset(meta.get("hashes") or ()),
            ids=frozenset(map(str, meta.get("ids") or ())) | frozenset(map(str, meta.get("probe_ids") or ())),
            sources=frozenset(str(meta.get("source") or "").split("+")) - {""},
        )

    def matches(self, rid: Any, prompt: Any, source: Any = None) -> bool:
        """Whether the prompt ``(rid, prompt, source)`` is one of the footprint's."""
        if isinstance(prompt, str) and normalise_prompt(prompt) and prompt_hash(prompt) in self.hashes:
            return True
        same_source = not source or not self.sources or str(source) in self.sources
        return rid is not None and str(rid) in self.ids and same_source

    def overlap(self, records: Iterable[Any]) -> list[str]:
        """Ids of ``records`` (dicts or objects with ``id``, ``prompt``, optional ``source``) that
        match the footprint, in order."""
        return [str(_field(r, "id")) for r in records
                if self.matches(_field(r, "id"), _field(r, "prompt"), _field(r, "source"))]
