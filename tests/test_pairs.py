"""Head-to-head pairs: which variants are paired by default, the paired statistics of one variant
against another, `--pairs` validation, and a real toy audit that writes, renders and prints them."""

import json

import pytest

from harness.cli import main
from harness.config import AuditConfig
from harness.errors import UserError
from harness.stats import default_pairs, pairwise_block


def _v(name, method, scheme, **options):
    return {"name": name, "method": method, "scheme": scheme, "options": options}


def test_default_pairs_aaq_against_ost_others_against_rtn():
    variants = [_v("fp", "fp", "fp"), _v("rtn4", "rtn", "w4a4kv4"), _v("ost4", "ost", "w4a4kv4"),
                _v("aaq4", "aaq", "w4a4kv4"), _v("quarot4", "quarot", "w4a4kv4"), _v("gptq16", "gptq", "w4a16"),
                _v("aaq3", "aaq", "w4a3"), _v("aaq3-a0", "aaq", "w4a3", alpha=0), _v("rtn3", "rtn", "w4a3")]
    assert default_pairs(variants) == [
        ("ost4", "rtn4"),         # OST's counterpart is RTN at its scheme
        ("aaq4", "ost4"),         # AAQ's is OST, not RTN
        ("quarot4", "rtn4"),
        ("aaq3", "aaq3-a0"),      # an AAQ with alpha=0 is OST's objective
        ("aaq3-a0", "rtn3"),      # ... and is itself paired like OST
    ]                             # gptq16 has no RTN at w4a16 in the run: no pair


def test_default_pairs_prefer_the_counterpart_with_the_same_shared_options():
    """Found on the real W4A16 table: AAQ with RTN weights was paired with the first OST of its
    scheme (GPTQ weights) instead of the OST with RTN weights beside it."""
    variants = [_v("ost", "ost", "w4a16", weights="auto", steps=100), _v("aaq", "aaq", "w4a16", weights="auto", steps=100),
                _v("ost-rtnw", "ost", "w4a16", weights="rtn", steps=100),
                _v("aaq-rtnw", "aaq", "w4a16", weights="rtn", steps=100, alpha=0.75, k=500)]
    assert dict(default_pairs(variants)) == {"aaq": "ost", "aaq-rtnw": "ost-rtnw"}
    # no counterpart with the same options: the first one, as before
    assert default_pairs([_v("ost", "ost", "w4a16", steps=20), _v("aaq", "aaq", "w4a16", steps=100)]) == [("aaq", "ost")]


def test_default_pairs_aaq_falls_back_to_rtn():
    assert default_pairs([_v("rtn", "rtn", "w4a4"), _v("aaq", "aaq", "w4a4", alpha=0.75)]) == [("aaq", "rtn")]


def _rows(variant, verdicts, label="harmful", set_name="harmful"):
    return [{"variant": variant, "set": set_name, "id": str(i), "label": label, "verdict": v}
            for i, v in enumerate(verdicts)]


def test_pairwise_block_counts_a_against_b():
    # b refuses prompts 0-5, a refuses 0-1 and 6-9: a lost 4 of b's refusals and gained 4.
    b = ["refusal"] * 6 + ["compliance"] * 4
    a = ["refusal"] * 2 + ["compliance"] * 4 + ["refusal"] * 4
    benign_b = ["compliance"] * 5
    benign_a = ["refusal"] * 2 + ["compliance"] * 3
    rows = (_rows("A", a) + _rows("B", b) + _rows("A", benign_a, "benign", "benign")
            + _rows("B", benign_b, "benign", "benign"))
    [block] = pairwise_block(rows, [("A", "B")], origin="user", n_boot=200)
    harmful = block["sets"]["harmful"]
    assert block["a"] == "A" and block["b"] == "B" and block["origin"] == "user"
    assert harmful["n_pairs"] == 10
    assert harmful["flips"]["refusal_lost"] == 4 and harmful["flips"]["refusal_gained"] == 4
    assert harmful["refusal_diff"] == 0.0 and harmful["mcnemar_p"] == pytest.approx(1.0)
    benign = block["overall"]["benign"]
    assert benign["refusal_diff"] == pytest.approx(0.4) and benign["new_overrefusals"] == 2


def test_pairs_option_validation():
    config = AuditConfig(variants=["fp", "rtn:w4a4", "quarot:w4a4"])
    specs = config.variant_specs()
    assert AuditConfig(pairs=["quarot-w4a4=rtn-w4a4"]).variant_pairs(specs) == [("quarot-w4a4", "rtn-w4a4")]
    assert AuditConfig(pairs="quarot-w4a4=fp").variant_pairs(specs) == [("quarot-w4a4", "fp")]  # a TOML string
    for bad in ("quarot-w4a4", "quarot-w4a4=nope", "fp=fp", "=fp"):
        with pytest.raises(UserError, match="must be A=B"):
            AuditConfig(pairs=[bad]).variant_pairs(specs)


def test_unknown_pair_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["audit", "--variants", "fp", "rtn:w4a4", "--pairs", "rtn-w4a4=ost", "--out", str(out)])
    assert code == 2
    assert "pair 'rtn-w4a4=ost' must be A=B" in capsys.readouterr().err
    assert not out.exists()


def test_audit_writes_renders_and_prints_pairs(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code = main(["audit", "--variants", "fp", "rtn:w4a4", "quarot:w4a4", "--pairs", "fp=quarot-w4a4",
                 "--limit", "4", "--max-new-tokens", "8", "--batch-size", "4", "--ppl-max-tokens", "256",
                 "--ppl-window", "64", "--ppl-stride", "64", "--no-probes", "--bootstrap", "200", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    pairs = summary["statistics"]["pairs"]
    assert [(p["a"], p["b"], p["origin"]) for p in pairs] == [("fp", "quarot-w4a4", "user"),
                                                              ("quarot-w4a4", "rtn-w4a4", "default")]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    by = {(r["variant"], r["set"], r["id"]): r["verdict"] == "refusal" for r in rows}
    harmful = pairs[1]["sets"]["harmful"]
    lost = sum(by[("rtn-w4a4", "harmful", i)] and not by[("quarot-w4a4", "harmful", i)]
               for (v, s, i) in by if v == "quarot-w4a4" and s == "harmful")
    assert harmful["n_pairs"] == 4 and harmful["flips"]["refusal_lost"] == lost
    assert "quarot-w4a4 against rtn-w4a4 (default pair):" in printed
    assert "fp against quarot-w4a4 (asked for):" in printed
    html = (out / "report.html").read_text()
    assert 'id="pairs"' in html and "Head to head" in html

    # compare of the run with itself prints the table on the terminal, not only the page's path
    assert main(["compare", str(out), str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "quarot-w4a4 (B) against quarot-w4a4 (A)" in printed and "McNemar" in printed
    assert "all harmful" in printed and "compare:" in printed
