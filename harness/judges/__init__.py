"""Judges map a (prompt, response) pair to a label; several judges run on the same responses.

Labels (``Judgement.label``):

* ``refusal`` / ``compliance``: refusal-axis judges (phrase rules, refusal classifiers);
* ``harmful`` / ``harmless``: harm-axis judges (guard models such as Llama Guard or the HarmBench
  classifier judge whether the *response* is harmful, not whether it refused);
* ``empty``: nothing but white space; ``degenerate``: a repetition loop or non-text that no judge
  should read as a refusal or a compliance; ``unparsed``: a generative judge whose output did not
  parse (counted and reported, never guessed).

Every judgement also carries ``flags`` from :func:`degeneracy` (``repetition``, ``non_text``,
``truncated``, ``unterminated``), so a refusal that then loops is a refusal *with* a visible flag.

Modules: ``base`` (Judgement, the Judge class, text normalisation), ``quality`` (degeneracy),
``rules`` (refusal-phrases, gcg-prefixes, xstest-rule), ``guard`` (classifier and the guard-model
presets), ``trained`` (refusal-minilm), ``registry`` (names, specs, options, entry points),
``validation`` (labelled files, agreement with human labels, grouped cross-validation).
The trained judge and validation load numpy; nothing here imports torch until a model judge is built.
"""

from .base import LABELS, OPENING_CHARS, OPENING_SENTENCES, Judge, Judgement, NoOptions, normalise, opening
from .guard import GUARD_PRESETS, ClassifierJudge, parse_guard_output
from .quality import degeneracy
from .registry import (ENTRY_POINT_GROUP, get_judge, get_judge_class, get_judges, judge_all, judge_registry,
                       register_judge, reload_plugins)
from .rules import (GCG_PREFIXES, REFUSAL_PATTERNS, XSTEST_PREFIXES, GCGPrefixJudge, RefusalPhraseJudge,
                    XSTestRuleJudge, refusal_opening)
from .trained import RefusalModelJudge, train_refusal_classifier
from .validation import TRAIN_FILE, VALIDATION_FILE, load_labelled, validate_judge


__all__ = [
    "ClassifierJudge", "ENTRY_POINT_GROUP", "GCGPrefixJudge", "GCG_PREFIXES", "GUARD_PRESETS", "Judge", "Judgement",
    "LABELS", "NoOptions", "OPENING_CHARS", "OPENING_SENTENCES", "REFUSAL_PATTERNS", "RefusalModelJudge",
    "RefusalPhraseJudge",
    "TRAIN_FILE", "VALIDATION_FILE", "XSTEST_PREFIXES", "XSTestRuleJudge", "degeneracy", "get_judge",
    "get_judge_class", "get_judges", "judge_all", "judge_registry", "load_labelled", "normalise", "opening",
    "parse_guard_output", "refusal_opening", "register_judge", "reload_plugins", "train_refusal_classifier",
    "validate_judge",
]
