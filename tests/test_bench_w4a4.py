"""bench/bench_w4a4.py's diagnostics on the toy model: --fp-prefix keeps the first positions'
activations and KV entries as they came in (and only inside its block), --saved scores a folder."""

import torch
from conftest import load_bench

from quantizers import modules


def _bench():
    return load_bench("bench_w4a4")


def test_fp_prefix_keeps_the_first_positions_and_restores_the_quantizers_after():
    bench = _bench()
    acts = torch.randn(2, 7, 16) * 3
    kv = torch.randn(2, 4, 7, 8) * 3
    originals = modules.fake_quant_activation, modules.fake_quant_kv
    with bench.keep_prefix_unquantized(2):
        qa, qkv = modules.fake_quant_activation(acts, 4), modules.fake_quant_kv(kv, 4)
    assert (modules.fake_quant_activation, modules.fake_quant_kv) == originals
    assert torch.equal(qa[:, :2], acts[:, :2]) and torch.equal(qkv[:, :, :2], kv[:, :, :2])
    assert torch.equal(qa[:, 2:], originals[0](acts, 4)[:, 2:])
    assert torch.equal(qkv[:, :, 2:], originals[1](kv, 4)[:, :, 2:])
    assert not torch.equal(qa[:, 2:], acts[:, 2:])


def _ppl_rows(text: str) -> dict[str, float]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {f"{r[0]} {r[2]}": float(r[3]) for r in rows if r[0] != "method" and not r[0].startswith("---")}


def test_fp_prefix_changes_the_quantized_rows_only_and_saved_folders_are_scored(tmp_path, capsys, one_thread):
    from harness.cli import main

    saved = tmp_path / "rtn"
    assert main(["-q", "quantize", "--model", "toy-chat", "--method", "rtn", "--scheme", "w4a4kv4",
                 "--out", str(saved)]) == 0
    argv = ["--model", "toy-chat", "--methods", "fp", "rtn", "--schemes", "w4a4kv4", "--eval-tokens", "512"]
    assert _bench().main(argv + ["--saved", str(saved)]) == 0
    plain = _ppl_rows(capsys.readouterr().out)
    assert _bench().main(argv + ["--fp-prefix", "4"]) == 0
    sink = _ppl_rows(capsys.readouterr().out)
    assert plain["fp fp"] == sink["fp fp"]
    assert plain["rtn w4a4kv4"] != sink["rtn w4a4kv4"]
    assert plain[f"rtn (saved: {saved}) w4a4kv4"] == plain["rtn w4a4kv4"]


def test_bad_arguments_are_one_error_line(tmp_path, capsys):
    for extra, message in ((["--saved", str(tmp_path)], "not a `safequant quantize` folder"),
                           (["--fp-prefix", "-1"], "must be >= 0")):
        assert _bench().main(["--model", "toy-chat", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
