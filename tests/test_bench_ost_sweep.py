"""bench/bench_ost_sweep.py on the toy pair: each configuration trains in its own process, is scored
on a selection slice disjoint from calibration, and a re-run prints the same table from the cache."""


import pytest
from conftest import load_bench


def _bench():
    return load_bench("bench_ost_sweep")


def _rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows if cells[0].strip() != "config"}


def test_sweep_trains_each_config_once_and_scores_it_on_the_selection_slice(tmp_path, capsys, one_thread):
    argv = ["--model", "toy-chat", "--scheme", "w4a4kv4", "--steps", "1", "--calib-samples", "4", "--calib-len", "32",
            "--tokens", "256", "--eval-tokens", "256", "--configs", "slow=lr_rotation=0.001", "fast=lr_rotation=0.05",
            "--evaluate", "fast", "--out", str(tmp_path)]
    assert _bench().main(argv) == 0
    first = _rows(capsys.readouterr().out)
    assert set(first) == {"slow", "fast"}
    assert float(first["slow"][5]) > 0 and float(first["fast"][7]) > 0 and first["slow"][7] == ""
    stamp = (tmp_path / "variants" / "fast" / "variant.json").stat().st_mtime_ns

    assert _bench().main(argv) == 0
    again = capsys.readouterr().out
    assert "quantizing" not in again and _rows(again) == first
    assert (tmp_path / "variants" / "fast" / "variant.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("extra, message", [(["--select-span", "0.4:0.6"], "overlaps --calib-span"),
                                            (["--evaluate", "nope"], "not among --configs")])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, extra, message):
    assert _bench().main(["--configs", "a=lr_rotation=0.01", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
