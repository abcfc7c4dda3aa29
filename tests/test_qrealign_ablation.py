"""bench/bench_qrealign_ablation.py end to end on the toy family: a row really quantizes (its
readout comes from the variant's own diagnostics and its options reach the quantizer), a finished
row is not run again, and a row name that is not an ablation is one line, exit 2."""

import importlib.util
import json

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_qrealign_ablation", REPO / "bench" / "bench_qrealign_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY = ["--model", "toy-chat-eroded", "--probe-model", "toy-chat", "--ppl-tokens", "512",
       "--recipe", "n_prompts=8,epochs_shallow=1,epochs_deep=1,diagnostic_prompts=8"]


def test_a_row_quantizes_scores_and_resumes(tmp_path, shared_data, capsys):
    bench = _bench()
    argv = [*TOY, "--out", str(tmp_path), "--ablation", "m3=probe_margin=3", "other=probe_margin=1", "--only", "m3"]
    assert bench.main(argv) == 0
    row = json.loads((tmp_path / "m3" / "ablation.json").read_text())
    info = json.loads((tmp_path / "m3" / "variant.json").read_text())
    assert info["options"]["probe_margin"] == 3.0 and info["options"]["n_prompts"] == 8
    assert set(row["readout"]) == {"aligned", "fp", "quantized"}
    assert 0.0 <= row["readout"]["quantized"]["harmful"] <= 1.0
    assert row["perplexity"] > 1.0 and row["block_steps"] > 0
    assert not (tmp_path / "other").exists()
    table = capsys.readouterr().out
    assert "| m3 | probe_margin=3 |" in table and "toy-chat-eroded FP" in table

    before = (tmp_path / "m3" / "variant.json").stat().st_mtime_ns
    assert bench.main(argv) == 0  # finished: read back, not quantized again
    assert (tmp_path / "m3" / "variant.json").stat().st_mtime_ns == before


def test_unknown_row_is_one_line_exit_2(tmp_path, capsys):
    bench = _bench()
    assert bench.main([*TOY, "--out", str(tmp_path), "--only", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "--only" in err[0]


def test_malformed_ablation_is_one_line_exit_2(tmp_path, capsys):
    bench = _bench()
    assert bench.main([*TOY, "--out", str(tmp_path), "--ablation", "justaname"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=KEY=VALUE" in err[0]
