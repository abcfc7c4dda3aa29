"""bench/bench_w4a4.py's options on the toy model: --fp-prefix adds the fpprefix modifier to the
quantized rows' schemes, --saved scores a folder."""

from conftest import load_bench


def _bench():
    return load_bench("bench_w4a4")


def test_fp_prefix_adds_the_modifier_where_activations_or_kv_are_quantized():
    add = _bench().with_fp_prefix
    assert add("w4a4kv4-aasym-aclip0.9", 1) == "w4a4kv4-aasym-aclip0.9-fpprefix1"
    assert add("w16a16kv4", 2) == "w16a16kv4-fpprefix2"
    assert add("w4a16", 1) == "w4a16" and add("fp", 1) == "fp" and add("w4a4kv4", 0) == "w4a4kv4"


def _ppl_rows(text: str) -> dict[str, float]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {f"{r[0]} {r[2]}": float(r[3]) for r in rows if r[0] != "method" and not r[0].startswith("---")}


def test_fp_prefix_changes_the_quantized_rows_only_and_reaches_saved_folders(tmp_path, capsys, one_thread):
    from harness.cli import main

    saved = tmp_path / "rtn"
    assert main(["-q", "quantize", "--model", "toy-chat", "--method", "rtn", "--scheme", "w4a4kv4",
                 "--out", str(saved)]) == 0
    argv = ["--model", "toy-chat", "--methods", "fp", "rtn", "--schemes", "w4a4kv4", "--eval-tokens", "512"]
    assert _bench().main(argv + ["--saved", str(saved)]) == 0
    plain = _ppl_rows(capsys.readouterr().out)
    assert _bench().main(argv + ["--fp-prefix", "4", "--saved", str(saved)]) == 0
    sink = _ppl_rows(capsys.readouterr().out)
    assert plain["fp fp"] == sink["fp fp"]
    assert plain["rtn w4a4kv4"] != sink["rtn w4a4kv4-fpprefix4"]
    assert plain[f"rtn (saved: {saved}) w4a4kv4"] == plain["rtn w4a4kv4"]
    assert sink[f"rtn (saved: {saved}) w4a4kv4-fpprefix4"] == sink["rtn w4a4kv4-fpprefix4"]


def test_bad_arguments_are_one_error_line(tmp_path, capsys):
    for extra, message in ((["--saved", str(tmp_path)], "not a `safequant quantize` folder"),
                           (["--fp-prefix", "-1"], "must be >= 0")):
        assert _bench().main(["--model", "toy-chat", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
