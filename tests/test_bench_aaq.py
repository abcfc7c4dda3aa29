"""bench/bench_aaq.py end to end on the toy pair: every row is quantized in its own process, one
audit scores them, and the table, the pairs and the goal check come out of that audit's summary.
Checks an invariant the bench must keep: AAQ at alpha 0 is OST (same steps, data and seed), so
their rows have the same perplexity and the same per-prompt refusals."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_aaq_toy_table(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "bench/bench_aaq.py", "--model", "toy-chat", "--schemes", "w4a4kv4",
           "--sections", "main", "grid", "--alphas", "0", "--ks", "500", "--options", "steps=2",
           "--calib-samples", "4", "--calib-len", "64", "--sets", "harmful", "benign",
           "--perplexity-text", "toy-heldout", "--judges", "refusal-phrases", "--limit", "6", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("## AAQ on toy-chat", 1)[1]
    for name in ("fp", "rtn-w4a4kv4", "gptq-w4a4kv4", "quarot-w4a4kv4", "ost-w4a4kv4", "aaq-w4a4kv4",
                 "aaq-a0-k500-w4a4kv4"):
        assert f"| {name} |" in table
    assert "aaq-w4a4kv4 vs ost-w4a4kv4 | harmful" in table
    assert "aaq-w4a4kv4 vs ost-w4a4kv4: AAQ perplexity within 1.1x of OST's:" in table
    # every AAQ row, the grid's too, is paired with and judged against its OST twin
    assert "aaq-a0-k500-w4a4kv4 vs ost-w4a4kv4 | harmful | +0.0%" in table
    assert "aaq-a0-k500-w4a4kv4 vs ost-w4a4kv4: AAQ perplexity within 1.1x of OST's: PASS (1.000x)" in table

    summary = json.loads((out / "audit" / "summary.json").read_text())
    metrics = {v["name"]: v["metrics"] for v in summary["variants"]}
    assert metrics["aaq-a0-k500-w4a4kv4"]["perplexity"] == pytest.approx(metrics["ost-w4a4kv4"]["perplexity"], rel=1e-6)
    rows = [json.loads(line) for line in (out / "audit" / "rows.jsonl").read_text().splitlines()]
    verdicts = {(r["variant"], r["set"], r["id"]): (r["response"], r["verdict"]) for r in rows}
    for (variant, s, i), verdict in verdicts.items():
        if variant == "ost-w4a4kv4":
            assert verdicts[("aaq-a0-k500-w4a4kv4", s, i)] == verdict
    for name in ("ost-w4a4kv4", "aaq-w4a4kv4"):
        cost = json.loads((out / "variants" / name / "bench.json").read_text())
        assert cost["peak_rss_bytes"] > 100 * 2**20 and cost["wall_seconds"] > 0

    # A second run resumes: no row is quantized again; here its goal is checked on AdvBench instead.
    again = subprocess.run([*cmd, "--sets", "harmful", "advbench", "--goal-set", "advbench",
                            "--audit-dir", str(tmp_path / "adv")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "quantizing" not in again.stdout
    assert "| advbench lost / gained vs FP |" in again.stdout
    assert "aaq-a0-k500-w4a4kv4 vs ost-w4a4kv4: AAQ keeps >= 95% of FP's refusal on advbench:" in again.stdout


@pytest.mark.parametrize("goal, fix", [("advbench", "add it to --sets"), ("benign", "choose a harmful set")])
def test_bench_aaq_goal_set_must_be_an_audited_harmful_set(tmp_path, goal, fix):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "bench/bench_aaq.py", "--sections", "main", "--schemes", "w4a16g64",
                           "--sets", "harmful", "benign", "--goal-set", goal, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"--goal-set {goal!r}" in done.stderr and fix in done.stderr
    assert not out.exists()


def test_bench_aaq_unknown_row_is_one_line_exit_2(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "bench/bench_aaq.py", "--sections", "main", "--schemes", "w4a16g64",
                           "--rows", "fp", "ost-w4a16", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--rows" in done.stderr and "'ost-w4a16'" in done.stderr
    assert "ost-w4a16g64" in done.stderr  # names the rows it knows
    assert not out.exists()


@pytest.mark.slow
def test_bench_aaq_split_rows_reuse_the_shared_cache(tmp_path):
    """Two processes' share of the table (--rows, --no-audit, --audit-dir), then the full run:
    it quantizes nothing and generates nothing again (the audits' shared cache serves it)."""
    out = tmp_path / "bench"
    base = [sys.executable, "bench/bench_aaq.py", "--model", "toy-chat", "--schemes", "w4a4kv4", "--sections", "main",
            "--calib-samples", "4", "--calib-len", "64", "--options", "steps=1", "--sets", "harmful",
            "--perplexity-text", "toy-heldout", "--judges", "refusal-phrases", "--limit", "3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFEQUANT_CACHE_DIR": str(tmp_path / "cache")}

    def run(*extra):
        done = subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    first = run("--rows", "rtn-w4a4kv4", "--no-audit")
    assert "quantizing rtn-w4a4kv4" in first.stdout and "auditing" not in first.stdout
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["rtn-w4a4kv4"]
    part = run("--rows", "fp", "rtn-w4a4kv4", "--audit-dir", str(tmp_path / "part"))
    assert [v["name"] for v in json.loads((tmp_path / "part" / "summary.json").read_text())["variants"]] == \
        ["fp", "rtn-w4a4kv4"]
    assert "quantizing" not in part.stdout
    whole = run("--rows", "fp", "rtn-w4a4kv4", "gptq-w4a4kv4")
    assert "quantizing gptq-w4a4kv4" in whole.stdout and "quantizing rtn" not in whole.stdout
    assert "| gptq-w4a4kv4 |" in whole.stdout and "| rtn-w4a4kv4 |" in whole.stdout
    summary = json.loads((out / "audit" / "summary.json").read_text())
    started = {v["name"]: v["backend"].get("started", True) for v in summary["variants"]}
    assert started == {"fp": False, "rtn-w4a4kv4": False, "gptq-w4a4kv4": True}  # fp, rtn: every row from the cache


def test_bench_aaq_limit_for_a_set_not_audited_is_one_line_exit_2(tmp_path):
    """--limit is the audit's grammar, checked against --sets before any row is quantized."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "bench/bench_aaq.py", "--sections", "main", "--schemes", "w4a16g64",
                           "--sets", "harmful", "benign", "--limit", "advbench=104", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "'advbench'" in done.stderr and "harmful, benign" in done.stderr
    assert not out.exists()
