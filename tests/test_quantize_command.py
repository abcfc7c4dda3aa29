"""`safequant quantize` end to end: a saved variant audits exactly like the in-memory one;
bad input is one line and exit 2 with nothing written."""

import json
import subprocess
import sys

import pytest

from harness.audit import Audit
from harness.cli import main
from harness.store import read_jsonl
from test_audit import small_config


def test_saved_variant_audits_like_the_in_memory_variant(tmp_path, capsys):
    folder = tmp_path / "rtn-w4a4kv4"
    assert main(["quantize", "--method", "rtn", "--scheme", "w4a4kv4", "--out", str(folder), "--device", "cpu"]) == 0
    info = json.loads((folder / "variant.json").read_text())
    assert info["method"] == "rtn" and info["scheme"] == "w4a4kv4" and info["source_model"]["fingerprint"].startswith("sha256:")
    summary = Audit(small_config(tmp_path / "run", variants=["rtn:w4a4kv4", f"saved={folder}"], probes=False,
                                 first_token=False)).run(command="test")
    memory, saved = summary["variants"][1], summary["variants"][2]
    assert saved["quantizer"]["artifact"] == str(folder) and saved["fingerprint"] == memory["fingerprint"]
    assert saved["metrics"] == memory["metrics"]
    rows = read_jsonl(tmp_path / "run" / "rows.jsonl")
    responses = {v: [(r["set"], r["id"], r["response"]) for r in rows if r["variant"] == v] for v in ("rtn-w4a4kv4", "saved")}
    assert responses["saved"] == responses["rtn-w4a4kv4"] and len(responses["saved"]) == 9


def test_saved_variant_of_another_model_is_refused(tmp_path):
    folder = tmp_path / "base-rtn"
    assert main(["quantize", "--model", "toy-base", "--method", "rtn", "--scheme", "w8a8", "--out", str(folder)]) == 0
    with pytest.raises(Exception, match="fingerprint"):
        Audit(small_config(tmp_path / "run", variants=[f"x={folder}"], probes=False)).run(command="test")


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown quantizer 'nope'"),
    (["--method", "rtn", "--scheme", "w5x"], "scheme"),
    (["--method", "rtn", "--option", "bogus=1"], "unknown option"),
    (["--method", "rtn", "--model", "no/such-model-here"], "could not load model"),
])
def test_bad_input_is_one_line_exit_2_and_no_folder(tmp_path, args, message):
    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "quantize", *args, "--out", str(out)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("safequant: error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".v.*"))
