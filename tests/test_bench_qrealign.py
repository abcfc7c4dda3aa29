"""bench/bench_qrealign.py's table from real audit run folders: a saved variant (NAME=DIR) is
loaded, not quantized, in the audit, so its calibration time must come from its variant.json."""

import json

from conftest import REPO, load_bench

from harness.cli import main


def _bench():
    return load_bench("bench_qrealign")


def test_a_saved_variant_reports_the_calibration_time_it_recorded(tmp_path, one_thread):
    saved = tmp_path / "gptq"
    assert main(["-q", "quantize", "--model", "toy-chat", "--method", "gptq", "--scheme", "w4a16",
                 "--calib-text", str(REPO / "harness" / "data" / "toy_heldout.txt"), "--calib-samples", "4",
                 "--calib-len", "64", "--out", str(saved)]) == 0
    recorded = json.loads((saved / "variant.json").read_text())["seconds"]
    run = tmp_path / "run"
    assert main(["-q", "audit", "--model", "toy-chat", "--variants", "fp", f"g={saved}", "rtn:w8a8",
                 "--prompt-sets", "harmful", "--limit", "2", "--no-probes", "--no-report", "--no-cache",
                 "--max-new-tokens", "8", "--ppl-max-tokens", "128", "--out", str(run)]) == 0
    result = _bench().smol_result([run])
    summary = {v["name"]: v for v in json.loads((run / "summary.json").read_text())["variants"]}

    assert result["variants"]["g"]["saved"] and result["variants"]["g"]["quantize_seconds"] == recorded
    assert summary["g"]["quantize_seconds"] != recorded  # the audit itself only loaded it
    assert not result["variants"]["rtn-w8a8"]["saved"]
    assert result["variants"]["rtn-w8a8"]["quantize_seconds"] == summary["rtn-w8a8"]["quantize_seconds"]
