"""The `llmcompressor` quantizer (quantizers/llmcompressor_plugin.py): llm-compressor's own
oneshot on the bundled toy model, its compressed-tensors folder loaded back as the variant.

The tests marked ``llmcompressor`` need the package, which lives in its own environment
(scripts/make_llmc_venv.sh; `.ci/run` runs ``-m llmcompressor`` there); elsewhere they skip, and
the one test of this file that runs there checks the missing-package message instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.artifacts import load_artifact, quantization_of
from harness.config import VariantSpec
from harness.quantize import VariantSettings, check
from quantizers import QuantScheme

HAVE_LLMC = importlib.util.find_spec("llmcompressor") is not None
CALIB = ["--calib-samples", "8", "--calib-len", "128"]


def quantize_cli(tmp_path, *args):
    # One thread, as the in-process tests (`one_thread`): GPTQ's Hessian sums differ in their last
    # bits between thread counts, and the folder is compared bit for bit with an in-process variant.
    return subprocess.run([sys.executable, "-m", "harness.cli", "quantize", "--model", "toy-chat",
                           "--method", "llmcompressor", *CALIB, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("safequant: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def on_grid(weight: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> bool:
    """Every weight is its group's scale (``scale[row, column // group]``) times an integer of
    the signed ``bits``-bit range."""
    q = weight.detach().double() / scale.double().repeat_interleave(group, dim=1)
    qmax = 2 ** (bits - 1)
    return bool((q - q.round()).abs().max() < 1e-4 and q.round().min() >= -qmax and q.round().max() <= qmax - 1)


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    if not HAVE_LLMC:
        pytest.skip("llmcompressor is not installed")
    tmp = tmp_path_factory.mktemp("llmc")
    out = tmp / "gptq-w4g64"
    result = quantize_cli(tmp, "--scheme", "w4a16g64", "--option", "recipe=gptq", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.llmcompressor
@pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed (scripts/make_llmc_venv.sh)")
def test_quantize_saves_llmcompressors_compressed_tensors_folder(gptq_folder, toy_chat):
    config = json.loads((gptq_folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 64, True)
    assert config["ignore"] == ["lm_head"]
    assert quantization_of(str(gptq_folder))["scheme"] == "w4a16g64"
    made_by = json.loads((gptq_folder / "safequant_quantize.json").read_text())
    assert made_by["metadata"]["versions"]["llmcompressor"] == importlib.metadata.version("llmcompressor")
    assert "GPTQModifier" in made_by["metadata"]["recipe_yaml"] and made_by["options"]["recipe"] == "gptq"
    assert made_by["calibration"]["n_samples"] == 8 and made_by["source_model"]["spec"] == "toy-chat"
    # Loaded back through transformers' compressed-tensors integration: every projection on its int4 grid.
    variant = load_artifact(str(gptq_folder), toy_chat, device="cpu")
    assert variant.record["provenance"]["made_by"]["method"] == "llmcompressor"
    scales = load_file(str(gptq_folder / "model.safetensors"))
    layer = variant.model.model.layers[1]
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        scale = scales[f"model.layers.1.{name}.weight_scale"]
        assert on_grid(layer.get_submodule(name).weight, scale, 4, 64)
    original = toy_chat.model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(layer.mlp.down_proj.weight, original)
    # the check can fail: the FP weights are on no such grid
    assert not on_grid(original, scales["model.layers.1.mlp.down_proj.weight_scale"], 4, 64)


@pytest.mark.llmcompressor
@pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed (scripts/make_llmc_venv.sh)")
def test_in_audit_variant_is_the_saved_folder(gptq_folder, toy_chat, one_thread):
    """Made in-process by the variant maker (oneshot again, same seed and calibration), the variant
    computes what the folder `safequant quantize` saved computes: same config, same logits."""
    from harness.calibration_data import CalibrationOptions

    spec = VariantSpec("llmc", "llmcompressor", QuantScheme.parse("w4a16g64"), {"recipe": "gptq"})
    settings = VariantSettings(calibration=CalibrationOptions(samples=8, length=128), device="cpu")
    maker = check([spec], toy_chat.source, settings)
    variant = maker.make(spec, toy_chat)
    assert variant.record["provenance"]["quantization"]["scheme"] == "w4a16g64"
    assert variant.record["metadata"]["recipe"] == "gptq"
    saved = load_artifact(str(gptq_folder), toy_chat, device="cpu").model
    ids = torch.tensor([[5, 17, 99, 240, 1000, 7, 3]])
    with torch.no_grad():
        mine, theirs, fp = (m(ids).logits for m in (variant.model, saved, toy_chat.model))
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, fp)
    assert variant.model is not toy_chat.model  # the audit's FP subject stays untouched
    assert not any(getattr(m, "quantization_scheme", None) for m in toy_chat.model.modules())


@pytest.mark.llmcompressor
@pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed (scripts/make_llmc_venv.sh)")
@pytest.mark.parametrize("recipe, scheme, modifier", [("smoothquant-gptq", "w8a8", "SmoothQuantModifier")])
def test_smoothquant_gptq_recipe(tmp_path, toy_chat, recipe, scheme, modifier):
    out = tmp_path / recipe
    result = quantize_cli(tmp_path, "--scheme", scheme, "--option", f"recipe={recipe}", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert modifier in (out / "recipe.yaml").read_text()
    assert quantization_of(str(out))["scheme"] == scheme
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    if scheme == "w8a8":
        acts = group["input_activations"]
        assert (acts["num_bits"], acts["strategy"], acts["dynamic"]) == (8, "token", True)
    variant = load_artifact(str(out), toy_chat, device="cpu").model
    with torch.no_grad():
        ids = torch.tensor([[5, 17, 99, 240, 1000, 7, 3]])
        q, fp = variant(ids).logits, toy_chat.model(ids).logits
    assert 0 < (q - fp).abs().max() < 0.5 * fp.abs().max()  # quantized: close to FP, not equal


@pytest.mark.llmcompressor
@pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed (scripts/make_llmc_venv.sh)")
def test_recipe_file_that_makes_another_scheme_is_refused(tmp_path):
    recipe = tmp_path / "w8.yaml"
    recipe.write_text("default_stage:\n  default_modifiers:\n    GPTQModifier:\n      targets: [Linear]\n"
                      "      ignore: [lm_head]\n      scheme: W8A16\n")
    out = tmp_path / "out"
    line = one_error_line(quantize_cli(tmp_path, "--scheme", "w4a16g64", "--option", f"recipe={recipe}",
                                       "--out", str(out)))
    assert "saved a w8a16g128 checkpoint, not the variant's scheme w4a16g64" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "safequant-tmp" in p.name]


@pytest.mark.llmcompressor
@pytest.mark.skipif(not HAVE_LLMC, reason="llmcompressor is not installed (scripts/make_llmc_venv.sh)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="AWQ runs where there is an accelerator")
def test_awq_without_an_accelerator_is_one_line(tmp_path):
    """llmcompressor 0.14's AWQModifier pins memory for an accelerator and crashes on a CPU-only
    machine; the quantizer says so before any model loads."""
    out = tmp_path / "out"
    line = one_error_line(quantize_cli(tmp_path, "--scheme", "w4a16g64", "--option", "recipe=awq", "--out", str(out)))
    assert "recipe awq needs an accelerator" in line and not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--scheme", "w4a16", "--option", "recipe=nonsense"], "recipe 'nonsense' is neither one of gptq"),
    (["--scheme", "w4a16kv4"], "quantizes the KV cache"),
    (["--scheme", "w8a8", "--option", "recipe=awq"], "recipe awq is weight-only"),
    (["--scheme", "w4a16", "--option", "recipe=smoothquant-gptq"], "smooths activations"),
    (["--scheme", "fp"], "keeps them in full precision"),
])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, args, fragment):
    out = tmp_path / "out"
    line = one_error_line(quantize_cli(tmp_path, *args, "--out", str(out)))
    assert fragment in line and not out.exists()


@pytest.mark.skipif(HAVE_LLMC, reason="llmcompressor is installed here")
def test_missing_package_names_the_install_command(tmp_path):
    out = tmp_path / "out"
    line = one_error_line(quantize_cli(tmp_path, "--scheme", "w4a16g128", "--out", str(out)))
    assert "needs the llmcompressor package" in line and "scripts/make_llmc_venv.sh" in line
    assert not out.exists()
