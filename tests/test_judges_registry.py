"""Judges as plugins: one registry pattern with the quantizers' (typed options, coercion, entry
points), specs parsed into options, and label counts reaching describe()."""

from __future__ import annotations

import dataclasses
import inspect
from importlib import metadata

import pytest

from harness.errors import UserError
from harness.judges import (ENTRY_POINT_GROUP, ClassifierJudge, Judge, Judgement, RefusalPhraseJudge, get_judge,
                            get_judge_class, judge_registry, register_judge, reload_plugins)
from harness.judges.registry import parse_judge_options, parse_spec


def test_builtins_are_registered_with_options_dataclasses():
    reg = judge_registry()
    assert {"refusal-phrases", "gcg-prefixes", "xstest-rule", "classifier", "refusal-minilm", "harmbench-cls",
            "llama-guard-3"} <= set(reg)
    for name, cls in reg.items():
        assert cls.name == name and dataclasses.is_dataclass(cls.Options), name


@pytest.mark.parametrize("name", ["classifier", "refusal-minilm"])
def test_options_mirror_the_constructor(name):
    """The Options dataclass is the constructor's keyword list: same names, same defaults."""
    cls = get_judge_class(name)
    params = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}
    fields = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    assert params == fields


def test_spec_strings_are_coerced_to_the_option_types():
    assert parse_spec("classifier:/m/x,batch_size=16,name=mine") == ("classifier", "/m/x",
                                                                       {"batch_size": 16, "name": "mine"})
    opts = parse_judge_options(ClassifierJudge, {"model": "/m", "threshold": "0.7", "answers": "yes:harmful;no:harmless"})
    assert opts.threshold == 0.7 and opts.answers == {"yes": "harmful", "no": "harmless"}
    with pytest.raises(UserError, match="option batch_size='many' for judge 'classifier': must be an integer"):
        parse_judge_options(ClassifierJudge, {"batch_size": "many"})
    with pytest.raises(UserError, match="unknown option.*colour.*valid options: model, kind"):
        get_judge("classifier:/m,colour=red")
    with pytest.raises(UserError, match="kind"):
        parse_judge_options(ClassifierJudge, {"kind": "magic"})
    with pytest.raises(UserError, match="takes no argument"):
        get_judge("refusal-phrases:/some/path")
    with pytest.raises(UserError, match=r"unknown judge 'vibes'.*classifier:MODEL"):
        get_judge("vibes")


def test_presets_are_classifier_judges_with_their_own_defaults():
    lg = get_judge_class("llama-guard-3").Options()
    hb = get_judge_class("harmbench-cls").Options()
    assert (lg.template, lg.kind, lg.max_new_tokens) == ("llama-guard", "generative", 10)
    assert (hb.template, hb.kind, hb.max_new_tokens) == ("harmbench", "generative", 1)
    assert issubclass(get_judge_class("harmbench-cls"), ClassifierJudge)


def test_describe_with_counts_reports_the_labels_given():
    judge = RefusalPhraseJudge()
    judge.judge_many(["p"] * 3, ["I'm sorry, but I can't help with that.", "", "Sure: step 1, open the box."])
    assert "counts" not in judge.describe()
    assert judge.describe(with_counts=True)["counts"] == {"compliance": 1, "empty": 1, "refusal": 1}


class EchoJudge(Judge):
    """A plugin judge for the test: refusal when the response says 'no'."""

    name = "echo-test"

    def judge(self, prompt, response, meta=None):
        return Judgement("refusal" if response.strip().lower() == "no" else "compliance", 0.0)


def test_entry_point_plugins_load_lazily_and_broken_ones_say_why(monkeypatch):
    good = metadata.EntryPoint("echo-test", f"{__name__}:EchoJudge", ENTRY_POINT_GROUP)
    bad = metadata.EntryPoint("broken-test", "no_such_module_xyz:Judge", ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points",
                        lambda **kw: [good, bad] if kw.get("group") == ENTRY_POINT_GROUP else real(**kw))
    assert "echo-test" in reload_plugins()
    assert [j.label for j in get_judge("echo-test").judge_many(["p", "p"], ["no", "yes"])] == ["refusal", "compliance"]
    with pytest.raises(UserError, match="judge plugin 'broken-test' failed to load"):
        get_judge("broken-test")
    with pytest.raises(UserError, match="already taken"):
        register_judge(type("Other", (EchoJudge,), {"__module__": "elsewhere"}))
