"""Third-party artifacts as variants (harness/artifacts.py): GGUF files written by the gguf
package's reference quantizers from the bundled toy model, audited next to their parent; an
artifact of another architecture or vocabulary, or one whose quantization library is missing, is
one line and exit 2 with nothing written."""

import copy
import hashlib
import json

import numpy as np
import pytest

from harness.artifacts import check_library, load_artifact, quantization_of
from harness.audit import Audit
from harness.cli import main
from harness.gguf_writer import write_reference_gguf
from harness.store import read_jsonl
from test_audit import small_config


@pytest.fixture(scope="module")
def toy_ggufs(tmp_path_factory, toy_chat):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: write_reference_gguf(toy_chat.model, toy_chat.tokenizer, folder / f"toy-chat-{t}.gguf", t)
            for t in ("Q8_0", "Q4_0")}


def test_gguf_weights_are_exactly_the_files(toy_ggufs, toy_chat):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    variant = load_artifact(str(toy_ggufs["Q4_0"]), toy_chat, device="cpu")
    tensor = next(t for t in GGUFReader(str(toy_ggufs["Q4_0"])).tensors if t.name == "blk.1.attn_v.weight")
    from_file = dequantize(tensor.data, tensor.tensor_type)
    loaded = variant.model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(loaded, from_file)
    original = toy_chat.model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    assert 0 < np.abs(loaded - original).max() < 0.2 * np.abs(original).max()  # 4-bit: close, not equal
    provenance = variant.record["provenance"]
    assert provenance["format"] == "gguf" and provenance["quantization"]["type"] == "Q4_0"
    assert provenance["sha256"] == hashlib.sha256(toy_ggufs["Q4_0"].read_bytes()).hexdigest()


def test_gguf_variants_audit_next_to_their_parent(toy_ggufs, tmp_path):
    out = tmp_path / "run"
    summary = Audit(small_config(out, variants=[f"q8={toy_ggufs['Q8_0']}", f"q4={toy_ggufs['Q4_0']}"],
                                 probes=False, first_token=False)).run(command="test")
    names = [v["name"] for v in summary["variants"]]
    assert names == ["fp", "q8", "q4"]
    q8, q4 = summary["variants"][1], summary["variants"][2]
    assert (q8["method"], q8["scheme"], q4["scheme"]) == ("gguf", "w8a16g32", "w4a16g32")
    assert q4["quantizer"]["provenance"]["quantization"]["tensor_types"] == {"Q4_0": 28}
    # Q8_0 barely moves the weights, Q4_0 moves them more: perplexity ratios order that way.
    ratios = [v["metrics"]["perplexity_ratio"] for v in summary["variants"]]
    assert ratios[0] == 1.0 and abs(ratios[1] - 1) < abs(ratios[2] - 1)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["variants"][2]["quantizer"]["provenance"]["sha256"] == q4["quantizer"]["provenance"]["sha256"]
    assert {r["variant"] for r in read_jsonl(out / "rows.jsonl")} == {"fp", "q8", "q4"}


def _other_architecture(toy_chat, tmp_path):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(toy_chat.model.config)
    config.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(config)
    return write_reference_gguf(model, toy_chat.tokenizer, tmp_path / "two-layers.gguf", "Q8_0")


def _other_vocabulary(toy_chat, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    definition = json.loads(toy_chat.tokenizer.backend_tokenizer.to_str())
    vocab = definition["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two token ids swapped: same size, other vocabulary
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(definition)))
    return write_reference_gguf(toy_chat.model, tokenizer, tmp_path / "swapped.gguf", "Q8_0")


def _missing_library(toy_chat, tmp_path):
    folder = tmp_path / "hqq-model"
    toy_chat.model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make, message", [
    (_other_architecture, "its num_hidden_layers is 2, the parent's 4"),
    (_other_vocabulary, "another vocabulary than 'toy-chat': 2 token ids differ"),
    (_missing_library, "quantized with hqq, whose library is not installed: run `pip install hqq`"),
])
def test_mismatched_artifact_is_one_line_exit_2_nothing_written(make, message, toy_chat, tmp_path, capsys):
    if make is _missing_library and not _absent("hqq"):
        pytest.skip("hqq is installed here")
    artifact = make(toy_chat, tmp_path)
    out = tmp_path / "run"
    code = main(["audit", "--model", "toy-chat", "--variants", f"x={artifact}", "--limit", "2", "--out", str(out),
                 "--device", "cpu", "--no-probes"])
    err = capsys.readouterr().err  # (the parent's loading progress bar comes first)
    ours = [line for line in err.splitlines() if line.startswith("safequant")]
    assert code == 2 and len(ours) == 1 and ours[0].startswith("safequant: error: ") and message in ours[0]
    assert "Traceback" not in err
    assert not out.exists()


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_quantization_config_names_its_scheme(tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}}))
    info = quantization_of(str(folder))
    assert (info["type"], info["scheme"], info["scheme_exact"]) == ("gptq", "w4a16g128-wasym", False)
    check_library("unknown-method", str(folder))  # transformers reports what it needs for the rest


@pytest.mark.slow
def test_torchao_int8_checkpoint_audits_as_a_variant(toy_chat, tmp_path):
    """torchao's int8 weight-only tensors run on the CPU: quantize toy-chat with transformers'
    TorchAoConfig, save it as safetensors, and load it back as a variant (torchao is not a
    project dependency: skipped where it is not installed)."""
    pytest.importorskip("torchao")
    import shutil

    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from harness.config import parse_variant
    from harness.models import TOY_MODELS_DIR

    folder = tmp_path / "toy-chat-int8-torchao"
    model = AutoModelForCausalLM.from_pretrained(TOY_MODELS_DIR / "toy-chat", dtype=torch.float32, device_map="cpu",
                                                 quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    model.save_pretrained(folder)
    for file in (TOY_MODELS_DIR / "toy-chat").glob("tokenizer*"):
        shutil.copy(file, folder)
    spec = parse_variant(f"ao={folder}")
    assert (spec.method, spec.scheme.label) == ("hf-quantized", "w8a16")
    variant = load_artifact(str(folder), toy_chat, device="cpu")
    weight = variant.model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor"  # torchao computes with its own tensors
    original = toy_chat.model.model.layers[0].self_attn.q_proj.weight
    assert 0 < (weight.dequantize() - original).abs().max() < 0.01 * original.abs().max()
    assert variant.record["provenance"]["quantization"]["type"] == "torchao"
