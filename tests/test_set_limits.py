"""Per-set prompt limits (`--limit N`, `--limit SET=N`, `limit = {SET = N}`) on the real data files
(../shared/data) and, end to end, on real toy-chat audits: which set is cut, what the run
records, and that runs with different limits share their common prompts instead of mixing."""

import json

import pytest

from harness.benchmarks import load_benchmarks
from harness.cli import main
from harness.errors import UserError
from harness.set_limits import SetLimits
from harness.store import read_jsonl

#: A cheap audit: the toy model, FP only, 8 new tokens, one rule judge, nothing optional.
FAST = ["--model", "toy-chat", "--variants", "fp", "--max-new-tokens", "8", "--judges", "refusal-phrases",
        "--no-probes", "--no-report", "--no-first-token", "--bootstrap", "100", "--ppl-max-tokens", "128"]


@pytest.mark.parametrize("value, default, per_set", [
    (None, None, {}), (50, 50, {}), ("50", 50, {}), (["50"], 50, {}),
    (["advbench=104"], None, {"advbench": 104}), (["50", "advbench=104"], 50, {"advbench": 104}),
    (["*=7", "xstest-safe=3"], 7, {"xstest-safe": 3}), ({"advbench": 104}, None, {"advbench": 104}),
    ({"*": 5, "advbench": 104}, 5, {"advbench": 104}),
])
def test_every_spelling_of_a_limit(value, default, per_set):
    limits = SetLimits.parse(value)
    assert (limits.default, dict(limits.per_set)) == (default, per_set)
    assert SetLimits.parse(limits.setting()) == limits  # what the config records reads back the same


@pytest.mark.parametrize("value, fragment", [
    (0, "positive integer"), (-3, "positive integer"), (True, "positive integer"), ("x", "positive integer"),
    (["advbench=0"], "'advbench=0'"), (["advbench=1.5"], "positive integer"), (["=4"], "set name is empty"),
    (["3", "4"], "given twice"), (["a=3", "a=4"], "'a' is given twice"), ({"advbench": False}, "positive integer"),
])
def test_bad_limits_say_which_item(value, fragment):
    with pytest.raises(UserError, match="limit") as err:
        SetLimits.parse(value)
    assert fragment in str(err.value)


def test_a_set_limit_cuts_only_that_set(shared_data):
    full = {ps.name: ps for ps in load_benchmarks(["harmful", "benign", "advbench", "xstest"], data_dir=shared_data)}
    assert len(full["advbench"]) == 520  # the upstream file
    cut = {ps.name: ps for ps in load_benchmarks(["harmful", "benign", "advbench", "xstest"], data_dir=shared_data,
                                                 limit={"advbench": 104, "xstest-safe": 10})}
    assert cut["advbench"].records == full["advbench"].records[:104]
    assert cut["xstest-safe"].records == full["xstest-safe"].records[:10]  # a group's member by its own name
    for name in ("harmful", "benign", "xstest-unsafe"):
        assert cut[name].records == full[name].records
    both = {ps.name: len(ps) for ps in load_benchmarks(["harmful", "advbench"], data_dir=shared_data,
                                                         limit=["5", "advbench=104"])}
    assert both == {"harmful": 5, "advbench": 104}
    assert len(load_benchmarks(["harmful"], limit={"harmful": 10**6})[0]) == len(full["harmful"])


def test_a_limit_for_a_set_the_run_lacks_names_it_and_the_run_sets(shared_data):
    with pytest.raises(UserError) as err:
        load_benchmarks(["harmful", "xstest"], data_dir=shared_data, limit={"xstest": 5})
    msg = str(err.value)
    assert "'xstest'" in msg and "harmful, xstest-safe, xstest-unsafe" in msg  # a group is named by its members


def _bad(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("safequant: error:"), lines
    return lines[0]


def test_bad_limits_on_the_command_line_are_one_line_exit_2(capsys, tmp_path, shared_data):
    out = tmp_path / "run"
    base = ["audit", *FAST, "--out", str(out), "--prompt-sets", "harmful", "advbench", "--data-dir", str(shared_data)]
    line = _bad(capsys, [*base, "--limit", "advbnch=104"])
    assert "'advbnch'" in line and "harmful, advbench" in line
    assert "positive integer" in _bad(capsys, [*base, "--limit", "advbench=0"])
    assert "positive integer" in _bad(capsys, [*base, "--limit", "many"])
    config = tmp_path / "c.toml"
    config.write_text("limit = {advbench = 0}\n", encoding="utf-8")
    assert "'advbench=0'" in _bad(capsys, [*base, "--config", str(config)])
    config.write_text('limit = {advbench = "104"}\n', encoding="utf-8")
    assert "limit" in _bad(capsys, [*base, "--config", str(config)])
    assert not out.exists()


def test_limit_table_in_a_config_file_and_the_flag_that_replaces_it(tmp_path, shared_data):
    config = tmp_path / "audit.toml"
    config.write_text('prompt_sets = ["harmful", "advbench"]\nlimit = {"*" = 2, advbench = 3}\n', encoding="utf-8")
    out = tmp_path / "run"
    common = ["-q", "audit", *FAST, "--config", str(config), "--data-dir", str(shared_data), "--no-cache"]
    assert main([*common, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["limit"] == {"*": 2, "advbench": 3}
    assert {k: v["n"] for k, v in summary["prompt_sets"].items()} == {"harmful": 2, "advbench": 3}
    assert summary["variants"][0]["counts"]["advbench"]["n"] == 3
    # a flag replaces the file's limit as a whole: advbench's own entry goes too
    flagged = tmp_path / "flagged"
    assert main([*common, "--out", str(flagged), "--limit", "1"]) == 0
    summary = json.loads((flagged / "summary.json").read_text())
    assert summary["config"]["limit"] == 1
    assert {k: v["n"] for k, v in summary["prompt_sets"].items()} == {"harmful": 1, "advbench": 1}


def test_runs_with_other_limits_share_their_common_prompts(tmp_path, shared_data):
    """advbench=3, then advbench=5 into the same run directory: the 3 rows are kept and only 2
    generated (the work file grows by 2, not 5); then advbench=2: no generation, 2 rows reported.
    A second run directory on the same shared cache reuses all 5."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    base = ["-q", "audit", *FAST, "--prompt-sets", "harmful", "advbench", "--data-dir", str(shared_data),
            "--cache-dir", str(cache)]
    work = out / "work" / "fp" / "advbench.jsonl"

    def run(limit: str, where=out) -> list[dict]:
        assert main([*base, "--out", str(where), "--limit", "2", limit]) == 0
        summary = json.loads((where / "summary.json").read_text())
        assert summary["prompt_sets"]["advbench"]["n"] == summary["variants"][0]["counts"]["advbench"]["n"]
        return [r for r in read_jsonl(where / "rows.jsonl") if r["set"] == "advbench"]

    three = run("advbench=3")
    assert len(three) == 3 and len(read_jsonl(work)) == 3
    five = run("advbench=5")
    assert len(five) == 5 and len(read_jsonl(work)) == 5  # 2 appended: the first 3 were not generated again
    assert [r["response"] for r in five[:3]] == [r["response"] for r in three]
    two = run("advbench=2")
    assert [r["id"] for r in two] == [r["id"] for r in five[:2]] and len(read_jsonl(work)) == 5
    other = tmp_path / "other"
    assert [r["response"] for r in run("advbench=5", other)] == [r["response"] for r in five]
    cached = [json.loads(line) for line in next(cache.glob("*/rows.jsonl")).read_text().splitlines()]
    assert len(cached) == 2 + 5  # harmful's 2 and advbench's 5, each generated once
