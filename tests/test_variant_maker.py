"""The variant maker (harness/quantize.py) shared by `quantize`, `audit` and `probe`: what a variant
needs is checked before any model loads, and `probe` makes variants like the other two commands
(a base model for AAQ, Q-realign calibrated in the probe prompts' chat template, the calibration
prompts kept apart from the probe prompts). Real toy models, the CLI entry `harness.cli.main`."""

from __future__ import annotations

import json

import pytest

import harness.models
from harness import quantize as maker
from harness.calibration_data import CALIBRATION_PROMPTS, CalibrationOptions
from harness.cli import main
from harness.config import parse_variant
from harness.errors import UserError
from harness.models import resolve_model

#: Q-realign at its smallest (8 calibration prompts, one epoch per block): seconds on the toy model.
TINY_QREALIGN = "qrealign:w8a8:n_prompts=8,epochs_shallow=1,epochs_deep=1"
PROBE_FAST = ["--limit", "10", "--no-figures", "--quiet-progress", "--device", "cpu"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model is loaded: the command must stop before that."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args[:1]}")

    monkeypatch.setattr(harness.models, "load_model", refuse)  # what the commands call
    monkeypatch.setattr(maker, "load_model", refuse)  # what the maker calls for base and probe models


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("safequant: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_needs_are_read_from_the_quantizers_and_their_options():
    specs = [parse_variant(v) for v in ("fp", "rtn:w4a4", "gptq:w4a16", "aaq:w4a4", "qrealign:w8a8",
                                        "quarot:w4a16", "quarot:w4a16:weights=gptq")]
    q = [maker._build(s, None) for s in specs]
    assert maker.Needs.of(q[:2]) == maker.Needs()
    assert maker.Needs.of(q[2:3]) == maker.Needs(text=True)
    assert maker.Needs.of(q[3:4]) == maker.Needs(text=True, base=True)
    assert maker.Needs.of(q[4:5]) == maker.Needs(prompts=True)
    # QuaRot needs no data, unless its weight step is asked to be GPTQ
    assert maker.Needs.of(q[5:6]) == maker.Needs()
    assert maker.Needs.of(q[6:7]) == maker.Needs(text=True)


def test_quarot_with_gptq_weights_is_calibrated_through_the_cli(tmp_path):
    """`weights=gptq` used to fail ("needs calibration data") although --calib-text was given: the
    maker loaded calibration only for methods whose class requires it."""
    out = tmp_path / "quarot-gptq"
    assert main(["quantize", "--model", "toy-chat", "--method", "quarot", "--scheme", "w4a16",
                 "--option", "weights=gptq", "--calib-text", "toy-pretrain", "--calib-samples", "4",
                 "--calib-len", "32", "--out", str(out)]) == 0
    record = json.loads((out / "variant.json").read_text())
    assert record["calibration"]["n_samples"] == 4
    assert record["metadata"]["weights"]["method"] == "gptq"


def test_base_auto_is_the_bundled_models_unaligned_base():
    assert maker.base_name("auto", "toy-chat") == "toy-base"
    assert maker.base_name("auto", "smol-chat") == "smol-base"
    assert maker.base_name("auto", "some/local/folder") is None
    assert maker.base_name("none", "toy-chat") is None and maker.base_name(None, "toy-chat") is None
    assert maker.base_name("Ablated", "toy-chat") == maker.ABLATED


def test_check_refuses_what_a_variant_cannot_get_before_loading(no_model_loads, tmp_path):
    source = resolve_model("toy-chat")
    with pytest.raises(UserError, match="aaq-w4a4 .*needs the unaligned base model"):
        maker.check([parse_variant("aaq:w4a4")], source, maker.VariantSettings(base="none"))
    with pytest.raises(UserError, match="not found"):
        maker.check([parse_variant("qrealign:w8a8")], source,
                    maker.VariantSettings(calibration=CalibrationOptions(prompts=str(tmp_path / "no.jsonl"))))
    calib = [(r["label"], r["id"], r["prompt"]) for r in maker.load_calibration_prompts("calibration")[:3]]
    with pytest.raises(UserError, match="also qrealign calibration prompts"):
        maker.check([parse_variant("qrealign:w8a8")], source, maker.VariantSettings(), evaluation=calib)
    allowed = maker.VariantSettings(calibration=CalibrationOptions(allow_overlap=True))
    assert maker.check([parse_variant("qrealign:w8a8")], source, allowed, evaluation=calib).needs.prompts
    # a method without calibration prompts does not care about the overlap
    assert not maker.check([parse_variant("rtn:w4a4")], source, maker.VariantSettings(), evaluation=calib).needs.prompts


def test_the_evaluation_system_prompt_reaches_a_prompt_calibrated_method():
    source = resolve_model("toy-chat")
    specs = [parse_variant(TINY_QREALIGN), parse_variant("own=qrealign:w8a8:system_prompt=mine")]
    made = maker.check(specs, source, maker.VariantSettings(system_prompt="Be careful."))
    assert made.quantizers["qrealign-w8a8"].options.system_prompt == "Be careful."
    assert made.quantizers["own"].options.system_prompt == "mine"  # the variant's own wins


def test_probe_aaq_without_a_base_fails_before_loading(no_model_loads, capsys, tmp_path):
    assert main(["probe", "--model", "toy-chat", "--base", "none", "--variant", "aaq:w4a4",
                 "--out", str(tmp_path / "p"), *PROBE_FAST]) == 2
    line = _error_line(capsys)
    assert "needs the unaligned base model" in line and "--base" in line
    assert not (tmp_path / "p").exists()


def test_probe_qrealign_refuses_calibration_prompts_as_probe_prompts(no_model_loads, capsys, tmp_path):
    assert main(["probe", "--model", "toy-chat-eroded", "--variant", "qrealign:w8a8",
                 "--benign", str(CALIBRATION_PROMPTS), "--out", str(tmp_path / "p"), *PROBE_FAST]) == 2
    line = _error_line(capsys)
    assert "also qrealign calibration prompts" in line and "--allow-calibration-overlap" in line


@pytest.mark.slow
def test_probe_aaq_gets_its_base_model(capsys, tmp_path, one_thread):
    """`--base auto` is toy-base for toy-chat, as in `audit` and `quantize` (2 AAQ steps: seconds)."""
    out = tmp_path / "p"
    assert main(["probe", "--model", "toy-chat", "--variant", "aaq:w8a8:steps=2", "--calib-samples", "4",
                 "--calib-len", "64", "--out", str(out), *PROBE_FAST]) == 0
    record = json.loads((out / "variants.json").read_text())["aaq-w8a8"]
    assert record["base"]["spec"] == "toy-base" and record["calibration"]["n_samples"] == 4
    names = [v["name"] for v in json.loads((out / "probe_summary.json").read_text())["variants"]]
    assert names == ["fp", "aaq-w8a8"]


@pytest.mark.slow
def test_probe_qrealign_calibrates_in_the_probe_prompts_template(capsys, tmp_path, one_thread):
    out = tmp_path / "p"
    assert main(["probe", "--model", "toy-chat-eroded", "--variant", TINY_QREALIGN, "--system-prompt",
                 "You are a careful assistant.", "--out", str(out), *PROBE_FAST]) == 0
    record = json.loads((out / "variants.json").read_text())["qrealign-w8a8"]
    assert record["options"]["system_prompt"] == "You are a careful assistant."
    assert record["calibration_prompts"]["source"] == "calibration" and record["calibration_prompts"]["ids"]
