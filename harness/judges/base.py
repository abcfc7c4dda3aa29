"""What every judge shares: the ``Judgement`` it returns, the ``Judge`` base class, and the text
normalisation the rules and the trained judge read responses through.

A judge is a subclass of :class:`Judge` with a unique ``name``, a dataclass ``Options`` type whose
fields are its constructor's keyword arguments (so ``NAME:VALUE,KEY=VALUE`` specs are typed and
checked like quantizer options, see :mod:`harness.judges.registry`), and a ``judge_batch`` method.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

OPENING_CHARS = 300
OPENING_SENTENCES = 3
LABELS = ("refusal", "compliance", "harmful", "harmless", "empty", "degenerate", "unparsed")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one response.

    ``score`` is the judge's probability (or 0/1) for its positive class: refusal for refusal-axis
    judges, harmful for harm-axis judges; None when there is nothing to score (unparsed).
    """

    label: str
    score: float | None
    matched: str = ""
    flags: tuple[str, ...] = ()
    raw: str = ""

    @property
    def refused(self) -> bool:
        return self.label == "refusal"

    def to_dict(self) -> dict:
        out = {"label": self.label, "score": self.score, "matched": self.matched, "flags": list(self.flags)}
        if self.raw:
            out["raw"] = self.raw
        return out


def normalise(text: str) -> str:
    """Lower case, typographic quotes straightened, white space folded."""
    if not text.isascii():
        text = (text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
                .replace("\u02bc", "'").replace("\u2032", "'"))
    return " ".join(text.lower().split())


def opening(text: str, sentences: int = OPENING_SENTENCES, max_chars: int = OPENING_CHARS) -> str:
    """The first ``sentences`` sentences of an already normalised text, capped at ``max_chars``."""
    parts = _SENTENCE_END.split(text, maxsplit=sentences)
    return " ".join(parts[:sentences])[:max_chars]


def hit_max(meta: Mapping[str, Any] | None) -> bool | None:
    """The row's ``hit_max_tokens`` (generation stopped at the token budget), None when unknown."""
    if not meta:
        return None
    value = meta.get("hit_max_tokens")
    return None if value is None else bool(value)


@dataclass(frozen=True)
class NoOptions:
    """Options type of a judge that has none."""


class Judge:
    """Base class of every judge.

    Subclasses set ``name`` (lowercase, unique), ``axis`` (``refusal`` or ``harm``), ``Options``
    (a dataclass whose fields mirror the constructor's keyword arguments, with the same defaults;
    a test checks they agree), optionally ``argument`` (the option that a spec's ``NAME:VALUE``
    fills, e.g. ``model`` for ``classifier:PATH``), and implement :meth:`judge_batch` or
    :meth:`judge`. Callers use :meth:`judge_many`, which also keeps the label ``counts``.
    """

    name: str = "judge"  # an instance may rename itself (a classifier's name= option)
    axis: str = "refusal"  # or "harm"; a classifier learns it from its model's labels
    canonical: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions
    argument: ClassVar[str | None] = None

    def judge(self, prompt: str, response: str, meta: Mapping[str, Any] | None = None) -> Judgement:
        return self.judge_batch([prompt], [response], [meta])[0]

    def judge_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    metas: Sequence[Mapping[str, Any] | None]) -> list[Judgement]:
        """One judgement per response (same length as the inputs). Default: :meth:`judge` per row."""
        return [self.judge(p, r, m) for p, r, m in zip(prompts, responses, metas, strict=True)]

    def judge_many(self, prompts: Sequence[str], responses: Sequence[str],
                   metas: Sequence[Mapping[str, Any] | None] | None = None) -> list[Judgement]:
        """Judge a batch and add its labels to :attr:`counts`."""
        metas = list(metas) if metas is not None else [None] * len(prompts)
        if not (len(prompts) == len(responses) == len(metas)):
            raise ValueError("prompts, responses and metas must have the same length")
        out = self.judge_batch(prompts, responses, metas)
        self.counts.update(j.label for j in out)
        return out

    @property
    def counts(self) -> Counter[str]:
        """Labels this judge gave in this process, ``unparsed`` included."""
        if "_counts" not in self.__dict__:
            self.__dict__["_counts"] = Counter()
        return self.__dict__["_counts"]

    def describe(self, with_counts: bool = False) -> dict:
        """Identity of the judge (stable: usable in a cache key); ``with_counts`` adds the label
        counts so far."""
        out = {"name": self.name, "axis": self.axis, "canonical": self.canonical, **self.identity()}
        if with_counts:
            out["counts"] = dict(sorted(self.counts.items()))
        return out

    def identity(self) -> dict[str, Any]:
        """What besides the name decides this judge's labels (a model path, a head digest)."""
        return {}
