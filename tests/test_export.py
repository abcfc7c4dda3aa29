"""`safequant export` (harness/variant_export.py): a saved variant written as a plain Hugging Face
folder or a GGUF file, audited next to its simulation (same responses, same labels), and the
variants a format cannot hold refused with the reason, exit 2, nothing written."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from harness.audit import Audit
from harness.cli import main
from harness.store import read_jsonl
from test_audit import small_config


@pytest.fixture(scope="module")
def saved_w4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants") / "rtn-w4a16g32"
    assert main(["quantize", "--method", "rtn", "--scheme", "w4a16g32", "--out", str(folder), "--device", "cpu"]) == 0
    return folder


@pytest.fixture(scope="module")
def exports(saved_w4):
    out = {}
    for fmt in ("hf", "gguf"):
        out[fmt] = saved_w4.parent / f"shipped-{fmt}"
        assert main(["export", str(saved_w4), "--format", fmt, "--out", str(out[fmt])]) == 0
    return out


def test_hf_export_holds_the_simulated_weights_bit_for_bit(saved_w4, exports):
    sim = load_file(str(saved_w4 / "model.safetensors"))
    shipped = load_file(str(exports["hf"] / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    assert np.array_equal(sim[name], shipped[name])
    config = json.loads((exports["hf"] / "config.json").read_text())
    assert "quantization_config" not in config  # a stock model folder: any runtime loads it
    record = json.loads((exports["hf"] / "safequant_export.json").read_text())
    assert record["variant"]["scheme"] == "w4a16g32" and record["exact"] is True


def test_gguf_export_packs_the_grid_into_q4_0(saved_w4, exports):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize, quantize

    record = json.loads((exports["gguf"] / "safequant_export.json").read_text())
    assert record["tensor_types"] == {"Q4_0": 28, "F32": 10}
    assert 0 < record["max_relative_error"] < 1e-3  # only the float16 block scale rounds
    tensor = next(t for t in GGUFReader(str(exports["gguf"] / "model.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
    sim = load_file(str(saved_w4 / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    shipped = dequantize(tensor.data, tensor.tensor_type)
    assert np.abs(shipped - sim).max() <= 1e-3 * np.abs(sim).max()
    # llama.cpp's own Q4_0 rounding (block maximum on -8) would re-quantize the grid, not keep it
    requantized = dequantize(quantize(sim, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert np.abs(requantized - sim).max() > 10 * np.abs(shipped - sim).max()


def test_exports_audit_like_the_simulation(saved_w4, exports, tmp_path):
    out = tmp_path / "run"
    summary = Audit(small_config(out, variants=[f"sim={saved_w4}", f"hf={exports['hf']}", f"gguf={exports['gguf']}"],
                                 pairs=["hf=sim", "gguf=sim"], probes=False, first_token=False)).run(command="test")
    assert [v["method"] for v in summary["variants"]] == ["fp", "rtn", "hf", "gguf"]
    rows = read_jsonl(out / "rows.jsonl")
    by = {v: {(r["set"], r["id"]): r for r in rows if r["variant"] == v} for v in ("sim", "hf", "gguf")}
    for shipped in ("hf", "gguf"):
        same_label = sum(by[shipped][k]["verdict"] == by["sim"][k]["verdict"] for k in by["sim"]) / len(by["sim"])
        assert same_label >= 0.98
    assert all(by["hf"][k]["response"] == by["sim"][k]["response"] for k in by["sim"])  # bit-exact weights
    pairs = [(p["a"], p["b"], p["origin"]) for p in summary["statistics"]["pairs"]]
    assert ("hf", "sim", "user") in pairs and ("gguf", "sim", "user") in pairs


@pytest.mark.parametrize("scheme, fmt, message", [
    ("w4a4", "gguf", "it quantizes activations (a4 on"),
    ("w4a4", "hf", "which a hf export does not carry"),
    ("w4a16kv4", "hf", "it quantizes the KV cache"),
    ("w4a16g32-wasym", "gguf", "its weights are asymmetric"),
    ("w4a16g48", "gguf", "weight groups of 48 do not fill GGUF's blocks of 32"),
])
def test_unrepresentable_variant_is_refused_with_the_reason(scheme, fmt, message, tmp_path, capsys):
    folder = tmp_path / "variant"
    assert main(["quantize", "--method", "rtn", "--scheme", scheme, "--out", str(folder), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", str(folder), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safequant: error: ") and message in err[0]
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_bad_export_input_is_one_line(saved_w4, exports, tmp_path, capsys):
    cases = [(["export", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "x")], "not a saved variant"),
             (["export", str(saved_w4), "--format", "hf", "--out", str(exports["hf"])], "already exists")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()
