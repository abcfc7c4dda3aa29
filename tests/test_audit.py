"""End-to-end audits on the real toy model: run directory, resume after interruption, determinism."""

import json

import pytest

from harness.audit import Audit
from harness.config import AuditConfig
from harness.store import read_jsonl


def small_config(out, **overrides) -> AuditConfig:
    values = dict(model="toy-chat", base="toy-base", variants=["fp", "rtn:w4a4"], limit=3, max_new_tokens=8,
                  batch_size=2, ppl_window=64, ppl_stride=64, ppl_max_tokens=256, out=str(out), device="cpu")
    values.update(overrides)
    return AuditConfig(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    summary = Audit(small_config(out)).run(command="test")
    return out, summary


def test_run_directory_contents(finished_run):
    out, summary = finished_run
    assert {p.name for p in out.iterdir()} >= {"summary.json", "rows.jsonl", "report.html", "work"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["schema_version"] == 2
    assert [v["name"] for v in on_disk["variants"]] == ["fp", "rtn-w4a4"]
    assert set(on_disk["prompt_sets"]) == {"harmful", "benign", "overrefusal"}
    rows = read_jsonl(out / "rows.jsonl")
    assert len(rows) == 2 * 3 * 3
    fp = on_disk["variants"][0]
    assert fp["metrics"]["perplexity_ratio"] == 1.0 and fp["metrics"]["perplexity"] > 1
    for variant in on_disk["variants"]:
        mine = [r for r in rows if r["variant"] == variant["name"] and r["set"] == "harmful"]
        refused = sum(r["verdict"] == "refusal" for r in mine)
        counts = variant["counts"]["harmful"]
        assert counts["n"] == 3 and counts["refusal"] == refused
        assert counts["refusal"] + counts["compliance"] + counts["empty"] + counts["degenerate"] == 3
        assert variant["metrics"]["refusal"]["harmful"] == pytest.approx(refused / 3)
    # judges[].counts: every label each judge gave over the run's rows
    primary = on_disk["judges"][0]
    assert primary["primary"] and sum(primary["counts"].values()) == len(rows)
    assert primary["counts"].get("refusal", 0) == sum(r["judges"][primary["name"]]["label"] == "refusal" for r in rows)


def test_interrupted_run_resumes_with_identical_results(finished_run, tmp_path):
    out, _ = finished_run
    expected = read_jsonl(out / "rows.jsonl")
    resumed = tmp_path / "resumed"
    # Simulate a kill mid-way: one finished variant, one half-written prompt file with a torn line.
    import shutil

    shutil.copytree(out / "work", resumed / "work")
    shutil.rmtree(resumed / "work" / "rtn-w4a4")
    harmful = resumed / "work" / "fp" / "harmful.jsonl"
    kept = harmful.read_text().splitlines(keepends=True)[:1]
    harmful.write_text("".join(kept) + '{"id": "torn')
    (resumed / "work" / "fp" / "benign.jsonl").unlink()
    Audit(small_config(resumed)).run(command="test")
    got = read_jsonl(resumed / "rows.jsonl")
    # A resumed batch holds other prompts than the original one, so padding differs and the
    # first-token probability may move in the 7th digit; everything else must be identical.
    for row_got, row_expected in zip(got, expected, strict=True):
        assert row_got.pop("first_token_refusal_prob") == pytest.approx(row_expected.pop("first_token_refusal_prob"), abs=1e-5)
        assert row_got == row_expected
    assert len(read_jsonl(harmful)) == 3, "the torn line is repaired and only missing prompts are added"
    first = json.loads((out / "summary.json").read_text())["judges"]
    again = json.loads((resumed / "summary.json").read_text())["judges"]
    assert [j["counts"] for j in again] == [j["counts"] for j in first]  # cached rows are counted too


def test_rerun_recomputes_nothing(finished_run):
    out, _ = finished_run
    files = sorted((out / "work").rglob("*.jsonl"))
    before = {p: p.read_bytes() for p in files}
    Audit(small_config(out)).run(command="test")
    assert {p: p.read_bytes() for p in files} == before


def test_changed_generation_setting_invalidates_cache(finished_run, tmp_path):
    out, _ = finished_run
    import shutil

    copy = tmp_path / "changed"
    shutil.copytree(out, copy)
    summary = Audit(small_config(copy, max_new_tokens=4, variants=["fp"])).run(command="test")
    rows = read_jsonl(copy / "rows.jsonl")
    assert len(rows) == 9 and summary["config"]["max_new_tokens"] == 4
    long_rows = {r["id"]: r["response"] for r in read_jsonl(out / "rows.jsonl") if r["variant"] == "fp"}
    assert all(len(r["response"]) <= len(long_rows[r["id"]]) for r in rows)


def test_probes_skipped_with_reason_when_sets_are_too_small(finished_run):
    _, summary = finished_run
    assert "3 harmful and 3 benign" in summary["probes"]["skipped"]


def test_probes_run_for_every_variant_and_reach_the_report(tmp_path):
    out = tmp_path / "probed"
    summary = Audit(small_config(out, limit=6, prompt_sets=["harmful", "benign"])).run(command="test")
    probes = summary["probes"]
    assert [v["name"] for v in probes["variants"]] == ["fp", "rtn-w4a4"]
    assert probes["layers"] == [0, 1, 2, 3]
    assert (out / "probes" / "layers.csv").is_file() and (out / "probes" / "probes_fp.safetensors").is_file()
    fp, variant = probes["variants"]
    assert fp["is_reference"] and variant["mean_transfer_drop"] is not None
    assert "Activation probes" in (out / "report.html").read_text()
