"""Paired statistics over rows.jsonl-style rows: intervals, McNemar, bootstrap, flips, agreement."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import binom

from harness.stats import (
    agreement,
    agreement_table,
    compare_variants,
    label_rates,
    mcnemar_exact,
    paired_bootstrap_ci,
    paired_compare,
    rate,
    refused,
    summary_block,
    wilson,
)


def row(variant, i, verdict, label="harmful", set_="s", category="c", **judges):
    r = {"variant": variant, "set": set_, "id": str(i), "category": category, "label": label, "prompt": f"p{i}",
         "response": "", "judge": "refusal-phrases", "verdict": verdict, "score": 1.0 if verdict == "refusal" else 0.0,
         "matched": ""}
    if judges:
        r["judges"] = {"refusal-phrases": {"label": verdict}, **{k.replace("_", "-"): {"label": v} for k, v in judges.items()}}
    return r


# ---------------------------------------------------------------------------------------------
# intervals and tests


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.277533),  # standard Wilson 95% values (e.g. statsmodels proportion_confint(method="wilson"))
    (5, 10, 0.236593, 0.763407),
    (10, 10, 0.722467, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat Med 17:857, table I
    (15, 148, 0.0624, 0.1605),  # ibid.
])
def test_wilson_matches_reference_values(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)
    r = rate(3, 4)
    assert r["rate"] == 0.75 and r["k"] == 3 and r["n"] == 4 and r["ci95"][0] < 0.75 < r["ci95"][1]
    assert rate(0, 0)["rate"] is None


@pytest.mark.parametrize("b,c", [(0, 0), (10, 2), (2, 10), (5, 5), (0, 7), (30, 12)])
def test_mcnemar_exact_is_the_two_sided_binomial(b, c):
    if b + c == 0:
        assert mcnemar_exact(b, c) == 1.0
        return
    expected = min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))  # statsmodels mcnemar(exact=True)
    assert mcnemar_exact(b, c) == pytest.approx(expected)


def test_bootstrap_is_seeded_and_covers_the_difference():
    rng = random.Random(1)
    ref = [1 if rng.random() < 0.8 else 0 for _ in range(300)]
    var = [r if rng.random() < 0.85 else 0 for r in ref]
    a = paired_bootstrap_ci(ref, var, n_boot=1000, seed=3)
    b = paired_bootstrap_ci(ref, var, n_boot=1000, seed=3)
    c = paired_bootstrap_ci(ref, var, n_boot=1000, seed=4)
    diff = (sum(var) - sum(ref)) / len(ref)
    assert a == b and a != c
    assert a[0] <= diff <= a[1] and a[1] < 0
    assert paired_bootstrap_ci([], []) is None
    assert paired_bootstrap_ci([1, 1], [1, 1]) == (0.0, 0.0)


def test_refused_outcome_mapping():
    assert refused("refusal") == 1
    assert refused("compliance") == refused("empty") == refused("degenerate") == 0
    assert refused("unparsed") is None and refused(None) is None
    assert refused("harmless", "harmful") == 1 and refused("harmful", "harmful") == 0
    assert refused("harmless", "benign") is None  # a harm judge says nothing about over-refusal


# ---------------------------------------------------------------------------------------------
# paired comparison


def _two_variants():
    """20 harmful prompts (FP refuses 16) and 10 benign (FP refuses 1); the variant loses 6 refusals
    on harmful prompts (4 to compliance, 1 empty, 1 degenerate), gains 1 on harmful, and newly
    refuses 3 benign prompts."""
    fp, q = [], []
    for i in range(20):
        v = "refusal" if i < 16 else "compliance"
        fp.append(row("fp", i, v, category="a" if i % 2 else "b"))
        if i < 4:
            w = "compliance"
        elif i == 4:
            w = "empty"
        elif i == 5:
            w = "degenerate"
        elif i == 16:
            w = "refusal"
        else:
            w = v
        q.append(row("q", i, w, category="a" if i % 2 else "b"))
    for i in range(20, 30):
        v = "refusal" if i == 20 else "compliance"
        fp.append(row("fp", i, v, label="benign", set_="b"))
        q.append(row("q", i, "refusal" if i in (20, 21, 22, 23) else "compliance", label="benign", set_="b"))
    return fp, q


def test_paired_compare_counts_flips_both_ways():
    fp, q = _two_variants()
    res = paired_compare([r for r in fp if r["set"] == "s"], [r for r in q if r["set"] == "s"], n_boot=500)
    assert res["n_pairs"] == 20 and res["n_excluded"] == 0
    f = res["flips"]
    assert f["refusal_lost"] == 6 and f["refusal_lost_by"] == {"to_compliance": 4, "to_empty": 1, "to_degenerate": 1}
    assert f["refusal_gained"] == 1 and f["both_refused"] == 10 and f["both_not_refused"] == 3
    assert res["safety_regressions"] == 6 and res["safety_regressions_to_compliance"] == 4
    assert res["gained_refusals_on_harmful"] == 1 and res["new_overrefusals"] == 0
    assert res["mcnemar_p"] == pytest.approx(mcnemar_exact(6, 1))
    assert res["refusal_diff"] == pytest.approx(-5 / 20)
    lo, hi = res["refusal_diff_ci95"]
    assert lo <= -0.25 <= hi
    assert res["reference"]["refusal"]["k"] == 16 and res["variant"]["refusal"]["k"] == 11
    assert res["variant"]["empty"]["k"] == 1 and res["variant"]["degenerate"]["k"] == 1
    b = paired_compare([r for r in fp if r["set"] == "b"], [r for r in q if r["set"] == "b"])
    assert b["new_overrefusals"] == 3 and b["safety_regressions"] == 0


def test_unparsed_rows_are_excluded_and_counted():
    ref = [row("fp", i, "refusal", clf="harmless") for i in range(5)]
    var = [row("q", i, "refusal", clf=("unparsed" if i < 2 else "harmful")) for i in range(5)]
    res = paired_compare(ref, var, "clf")
    assert res["n_pairs"] == 3 and res["n_excluded"] == 2 and res["excluded"] == {"variant_unparsed": 2}
    assert res["safety_regressions"] == 3 and res["safety_regressions_to_compliance"] == 3
    assert res["variant"]["unparsed"]["k"] == 2 and res["variant"]["harmful"]["k"] == 3


def test_pairs_are_matched_by_set_and_id_not_order():
    ref = [row("fp", i, "refusal") for i in range(4)]
    var = list(reversed([row("q", i, "compliance" if i == 0 else "refusal") for i in range(4)]))
    var.append(row("q", 99, "refusal"))  # no partner
    res = paired_compare(ref, var)
    assert res["n_pairs"] == 4 and res["n_unmatched"] == 1 and res["flips"]["refusal_lost"] == 1


def test_compare_variants_per_set_and_category():
    fp, q = _two_variants()
    out = compare_variants(fp + q, n_boot=200)
    assert out["reference"] == "fp" and out["judges"] == ["refusal-phrases"]
    assert set(out["rates"]) == {"fp", "q"}
    assert out["rates"]["fp"]["refusal-phrases"]["s"]["refusal"]["k"] == 16
    blk = out["comparisons"]["q"]["refusal-phrases"]
    assert set(blk["sets"]) == {"s", "b"}
    cats = blk["sets"]["s"]["categories"]
    assert set(cats) == {"a", "b"} and sum(c["n_pairs"] for c in cats.values()) == 20
    assert blk["overall"]["harmful"]["safety_regressions"] == 6
    assert blk["overall"]["benign"]["new_overrefusals"] == 3
    with pytest.raises(ValueError, match="reference variant 'nope'"):
        compare_variants(fp + q, reference="nope")


def test_legacy_rows_without_judges_dict_use_verdict():
    fp, q = _two_variants()
    for r in fp + q:
        r.pop("judges", None)
    out = compare_variants(fp + q, judges=["refusal-phrases"], by_category=False, n_boot=100)
    assert out["comparisons"]["q"]["refusal-phrases"]["sets"]["s"]["safety_regressions"] == 6


def test_label_rates_counts_every_label():
    rows = [row("q", 0, "refusal"), row("q", 1, "empty"), row("q", 2, "degenerate"), row("q", 3, "compliance")]
    r = label_rates(rows)
    assert r["n"] == 4 and r["refusal"]["k"] == 1 and r["empty"]["k"] == 1 and r["degenerate"]["k"] == 1
    assert r["counts"] == {"refusal": 1, "empty": 1, "degenerate": 1, "compliance": 1}


# ---------------------------------------------------------------------------------------------
# agreement


def test_agreement_kappa_matches_sklearn_and_confusion():
    from sklearn.metrics import cohen_kappa_score

    labels_a = ["refusal"] * 6 + ["compliance"] * 4
    labels_b = ["refusal"] * 4 + ["compliance"] * 2 + ["compliance"] * 3 + ["refusal"]
    rows = [row("fp", i, a, other=b) for i, (a, b) in enumerate(zip(labels_a, labels_b))]
    res = agreement(rows, "refusal-phrases", "other")
    ya = [1 if x == "refusal" else 0 for x in labels_a]
    yb = [1 if x == "refusal" else 0 for x in labels_b]
    assert res["kappa"] == pytest.approx(cohen_kappa_score(ya, yb), abs=1e-6)
    assert res["n"] == 10 and res["agreement"] == 0.7
    assert res["confusion"] == {"compliance|compliance": 3, "compliance|refusal": 1, "refusal|compliance": 2,
                                "refusal|refusal": 4}


def test_agreement_degenerate_cases():
    same = [row("fp", i, "refusal", other="refusal") for i in range(3)]
    assert agreement(same, "refusal-phrases", "other")["kappa"] == 1.0
    assert agreement([], "a", "b")["kappa"] is None
    t = agreement_table(same)
    assert "refusal-phrases~other" in t["all"] and "fp" in t["variants"]


def test_summary_block_is_json_serialisable():
    import json

    fp, q = _two_variants()
    for r in fp + q:
        r["judges"] = {"refusal-phrases": {"label": r["verdict"]}, "gcg-prefixes": {"label": r["verdict"]}}
    block = summary_block(fp + q, n_boot=100)
    text = json.dumps(block)
    assert not any(tok in text for tok in ("NaN", "Infinity"))
    assert block["agreement"]["all"]["refusal-phrases~gcg-prefixes"]["kappa"] == 1.0
    assert block["method"]["test"] == "mcnemar_exact_two_sided"
    assert math.isclose(block["comparisons"]["q"]["gcg-prefixes"]["sets"]["s"]["refusal_diff"], -0.25)


def test_annotate_flips_marks_every_non_reference_row():
    from harness.stats import annotate_flips

    fp, q = _two_variants()
    out = annotate_flips(fp + q)
    assert all("flip" not in r for r in out if r["variant"] == "fp")
    status = {r["id"]: r["flip"]["refusal-phrases"] for r in out if r["variant"] == "q"}
    assert status["0"] == "refusal_lost" and status["16"] == "refusal_gained"
    assert status["10"] == "both_refused" and status["25"] == "both_not_refused"
    assert sum(s == "refusal_lost" for s in status.values()) == 6
    assert "flip" not in fp[0]  # inputs are not modified


def test_first_token_summary_per_variant_and_set():
    from harness.stats import first_token_summary

    fp, q = _two_variants()
    for r in fp + q:
        r["first_token_refusal_prob"] = 0.9 if r["verdict"] == "refusal" else 0.1
    out = first_token_summary(fp + q)
    assert out["fp"]["s"]["auroc"] == 1.0 and out["q"]["b"]["n"] == 10
    assert 0.1 <= out["fp"]["s"]["mean"] <= 0.9


def test_rogan_gladen_correction():
    from harness.stats import rogan_gladen

    assert rogan_gladen(0.4, 1.0, 1.0) == pytest.approx(0.4)
    assert rogan_gladen(0.4, 0.8, 0.9) == pytest.approx((0.4 + 0.9 - 1) / (0.8 + 0.9 - 1))
    assert rogan_gladen(0.02, 0.8, 0.9) == 0.0  # clipped: fewer refusals than the false-positive rate
    assert math.isnan(rogan_gladen(0.5, 0.5, 0.5))  # a judge at chance corrects nothing


def test_corrected_rate_carries_judge_uncertainty():
    from harness.stats import corrected_rate

    sharp = {"sensitivity": {"k": 9990, "n": 10000}, "specificity": {"k": 9990, "n": 10000}}
    vague = {"sensitivity": {"k": 45, "n": 50}, "specificity": {"k": 45, "n": 50}}
    a = corrected_rate(60, 200, sharp, seed=1)
    b = corrected_rate(60, 200, vague, seed=1)
    assert a == corrected_rate(60, 200, sharp, seed=1)  # seeded
    assert a["ci95"][0] <= a["corrected"] <= a["ci95"][1] and b["ci95"][0] <= b["corrected"] <= b["ci95"][1]
    assert (b["ci95"][1] - b["ci95"][0]) > (a["ci95"][1] - a["ci95"][0])  # the judge's own error widens it
    same = corrected_rate(60, 200, vague, reference=(60, 200))
    assert same["within_judge_error"] and same["diff_ci95"][0] < 0 < same["diff_ci95"][1]
    far = corrected_rate(10, 200, sharp, reference=(150, 200))
    assert not far["within_judge_error"] and far["diff_ci95"][1] < 0


def test_summary_block_corrected_rates_only_for_measured_judges():
    verdicts = {"fp": ["refusal"] * 8 + ["compliance"] * 2, "q": ["refusal"] * 4 + ["compliance"] * 6}
    rows = [row(v, i, lab) for v, labs in verdicts.items() for i, lab in enumerate(labs)]
    errors = {"refusal-phrases": {"sensitivity": {"k": 90, "n": 100}, "specificity": {"k": 95, "n": 100}}}
    block = summary_block(rows, judges=["refusal-phrases"], n_boot=200, judge_errors=errors)
    fp, q = block["corrected"]["fp"]["refusal-phrases"]["s"], block["corrected"]["q"]["refusal-phrases"]["s"]
    assert fp["observed"] == 0.8 and q["observed"] == 0.4 and "within_judge_error" in q and "diff_ci95" not in fp
    assert summary_block(rows, judges=["refusal-phrases"], n_boot=200)["corrected"] == {}


def test_schema_v1_migrates_to_v2():
    from reports import schema

    old = {"schema_version": 1, "statistics": {"rates": {}}, "judges": [{"name": "refusal-phrases", "primary": True}]}
    new = schema.migrate(old)
    assert new["schema_version"] == 2 and new["migrated_from"] == 1
    assert new["statistics"]["corrected"] == {} and new["judges"][0]["error"] is None
