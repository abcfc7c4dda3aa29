"""`safequant export` (harness/variant_export.py): a saved variant written as a plain Hugging Face
folder, a GGUF file or a compressed-tensors folder, audited next to its simulation (same responses, same labels), and the
variants a format cannot hold refused with the reason, exit 2, nothing written."""

import importlib.util
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from harness.audit import Audit
from harness.cli import main
from harness.store import read_jsonl
from test_audit import small_config

#: compressed-tensors is the optional `ship` extra (.ci/run installs it).
HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed: pip install -e '.[ship]'")


@pytest.fixture(scope="module")
def saved_w4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants") / "rtn-w4a16g32"
    assert main(["quantize", "--method", "rtn", "--scheme", "w4a16g32", "--out", str(folder), "--device", "cpu"]) == 0
    return folder


@pytest.fixture(scope="module")
def exports(saved_w4):
    out = {}
    for fmt in ("hf", "gguf") + (("compressed-tensors",) if HAS_CT else ()):
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
    from harness.artifacts import quantization_of

    assert quantization_of(str(exports["hf"]))["scheme"] == "w4a16g32"  # audited under the variant's scheme


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


@needs_ct
def test_compressed_tensors_export_loads_back_bit_for_bit(saved_w4, exports, toy_chat):
    from harness.artifacts import load_artifact

    config = json.loads((exports["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32 and config["ignore"] == ["lm_head"]
    packed = load_file(str(exports["compressed-tensors"] / "model.safetensors"))
    assert packed["model.layers.0.mlp.up_proj.weight_packed"].dtype == np.int32  # 8 int4 values per int32
    variant = load_artifact(str(exports["compressed-tensors"]), toy_chat, device="cpu")
    sim = load_file(str(saved_w4 / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(variant.model.model.layers[0].mlp.up_proj.weight.detach().numpy(), sim)
    assert variant.record["provenance"]["quantization"]["type"] == "compressed-tensors"


def test_exports_audit_like_the_simulation(saved_w4, exports, tmp_path):
    out = tmp_path / "run"
    shipped = {"hf": "hf", "gguf": "gguf", **({"ct": "compressed-tensors"} if HAS_CT else {})}
    summary = Audit(small_config(out, variants=[f"sim={saved_w4}"] + [f"{n}={exports[f]}" for n, f in shipped.items()],
                                 pairs=[f"{n}=sim" for n in shipped], probes=False, first_token=False)).run(command="test")
    assert [v["method"] for v in summary["variants"]] == ["fp", "rtn", "hf", "gguf", "hf-quantized"][:2 + len(shipped)]
    assert {v["scheme"] for v in summary["variants"][1:]} == {"w4a16g32"}
    rows = read_jsonl(out / "rows.jsonl")
    by = {v: {(r["set"], r["id"]): r for r in rows if r["variant"] == v} for v in ("sim", *shipped)}
    for name in shipped:
        same_label = sum(by[name][k]["verdict"] == by["sim"][k]["verdict"] for k in by["sim"]) / len(by["sim"])
        assert same_label >= 0.98
    for exact in {"hf", "ct"} & set(shipped):  # bit-exact weights: the very same responses
        assert all(by[exact][k]["response"] == by["sim"][k]["response"] for k in by["sim"])
    pairs = [(p["a"], p["b"], p["origin"]) for p in summary["statistics"]["pairs"]]
    assert all((name, "sim", "user") in pairs for name in shipped)


@pytest.mark.parametrize("scheme, fmt, message", [
    ("w4a4", "gguf", "it quantizes activations (a4 on"),
    ("w4a4", "hf", "which a hf export does not carry"),
    pytest.param("w8a8", "compressed-tensors", "the runtime would round activations differently", marks=needs_ct),
    pytest.param("w4a16g32-wasym", "compressed-tensors", "its weights are asymmetric", marks=needs_ct),
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
