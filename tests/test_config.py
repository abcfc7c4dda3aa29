"""Variant specs and audit config: parsing, defaults, TOML, and one-line errors."""

import pytest

from harness.config import AuditConfig, parse_variant
from harness.errors import UserError


def test_parse_variant_forms():
    assert parse_variant("fp").name == "fp"
    v = parse_variant("rtn:w4a4kv4-aclip0.9")
    assert (v.name, v.method, v.scheme.w_bits, v.scheme.a_bits, v.scheme.kv_bits) == ("rtn-w4a4kv4-aclip0.9", "rtn", 4, 4, 4)
    assert v.scheme.a_clip_ratio == pytest.approx(0.9)
    named = parse_variant("strict=rtn:w4a16g128")
    assert named.name == "strict" and named.scheme.w_group_size == 128


@pytest.mark.parametrize("text, fragment", [
    ("nope:w4a4", "unknown quantizer 'nope'"),
    ("rtn:w4a4x", "w4a4x"),
    ("rtn:w4a4:clip", "KEY=VALUE"),
    (":w4a4", "no method"),
    ("rtn:w4a4:bogus=1", "bogus"),
])
def test_bad_variants_name_the_input(text, fragment):
    with pytest.raises(UserError) as err:
        parse_variant(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_fp_reference_is_always_first():
    specs = AuditConfig(variants=["rtn:w4a4"]).variant_specs()
    assert [s.name for s in specs] == ["fp", "rtn-w4a4"]


def test_duplicate_variant_names_rejected():
    with pytest.raises(UserError, match="used twice"):
        AuditConfig(variants=["fp", "rtn:w4a4", "rtn:w4a4"]).variant_specs()


def test_toml_config_and_overrides(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text('[audit]\nmodel = "toy-chat-eroded"\nvariants = ["fp", "rtn:w8a8"]\nmax_new_tokens = 16\n')
    config = AuditConfig.from_toml(str(path)).with_overrides({"max_new_tokens": 8, "seed": None})
    assert (config.model, config.variants, config.max_new_tokens, config.seed) == ("toy-chat-eroded", ["fp", "rtn:w8a8"], 8, 0)


@pytest.mark.parametrize("content, fragment", [
    ("model = [", "not valid TOML"),
    ('colour = "red"\n', "unknown keys ['colour']"),
])
def test_bad_toml(tmp_path, content, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        AuditConfig.from_toml(str(path))


def test_invalid_numbers_rejected():
    with pytest.raises(UserError, match="max_new_tokens must be a positive integer"):
        AuditConfig(max_new_tokens=0).validate()


def test_calibration_settings_keep_their_flat_keys(tmp_path):
    """One CalibrationOptions inside the config, but files, overrides and the summary still use
    the flat keys calib_text, calib_samples, ..., allow_overlap."""
    from harness.calibration_data import CalibrationOptions

    path = tmp_path / "audit.toml"
    path.write_text('[audit]\ncalib_samples = 8\ncalib_span = "0.4:1"\nallow_overlap = true\n', encoding="utf-8")
    config = AuditConfig.from_toml(str(path))
    assert config.calibration == CalibrationOptions(samples=8, span="0.4:1", allow_overlap=True)
    config = config.with_overrides({"calib_len": 64, "calib_samples": None})
    assert config.calibration == CalibrationOptions(samples=8, length=64, span="0.4:1", allow_overlap=True)
    settings = config.settings()
    assert "calibration" not in settings and settings["calib_len"] == 64 and settings["allow_overlap"] is True
    assert AuditConfig.from_settings(settings) == config
    path.write_text('calib_samples = "8"\n', encoding="utf-8")
    with pytest.raises(UserError, match="calib_samples"):
        AuditConfig.from_toml(str(path))
