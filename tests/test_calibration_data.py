"""Calibration data: seeded token windows from text files and the toy pretraining text, fingerprinted."""

import pytest
import torch

from harness.calibration_data import CalibrationSpec, load_calibration, parse_span
from harness.errors import UserError


def test_windows_are_seeded_fingerprinted_and_batched(toy_chat):
    spec = CalibrationSpec("toy-pretrain", n_samples=6, seq_len=32, batch_size=4, seed=1)
    a, b = load_calibration(spec, toy_chat.tokenizer), load_calibration(spec, toy_chat.tokenizer)
    assert [t.shape for t in a.batches] == [torch.Size([4, 32]), torch.Size([2, 32])]
    assert a.fingerprint == b.fingerprint and all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    other = load_calibration(CalibrationSpec("toy-pretrain", n_samples=6, seq_len=32, batch_size=4, seed=2), toy_chat.tokenizer)
    assert other.fingerprint != a.fingerprint
    assert a.describe()["tokens"] == 6 * 32


def test_span_keeps_calibration_text_apart_from_evaluation_text(toy_chat, shared_data):
    path = str(shared_data / "wikitext2_test.raw")
    data = load_calibration(CalibrationSpec(path, n_samples=4, seq_len=64, span=(0.5, 1.0)), toy_chat.tokenizer)
    text = (shared_data / "wikitext2_test.raw").read_text(encoding="utf-8")
    first_half = toy_chat.tokenizer(text[: len(text) // 2 - 2000], add_special_tokens=False)["input_ids"]
    window = data.batches[0][0].tolist()
    assert not any(first_half[i: i + 64] == window for i in range(0, len(first_half) - 64))
    assert data.source_sha256 == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_bad_calibration_input(toy_chat, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_calibration(CalibrationSpec(str(tmp_path / "missing.txt")), toy_chat.tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(UserError, match="fewer than one window"):
        load_calibration(CalibrationSpec(str(short), seq_len=64), toy_chat.tokenizer)
    with pytest.raises(UserError, match="span"):
        CalibrationSpec(span=(0.8, 0.2))
    with pytest.raises(UserError, match="START:END"):
        parse_span("half")


def test_builtin_calibration_prompts_are_disjoint_from_evaluation_sets():
    from harness.calibration_data import load_calibration_prompts
    from test_prompts import _builtin_records, _near_pairs, _norm

    calib = load_calibration_prompts()
    labels = [r["label"] for r in calib]
    assert labels.count("harmful") >= 150 and labels.count("benign") >= 150
    held = {_norm(r.prompt) for _, r in _builtin_records()}
    assert not [r["id"] for r in calib if _norm(r["prompt"]) in held]
    hits = _near_pairs([(r["id"], r["prompt"]) for r in calib], [r.prompt for _, r in _builtin_records()], 0.8)
    assert not hits, hits[:3]


def test_chat_source_is_benign_requests_answered_by_the_model_itself(toy_chat, tmp_path):
    import json

    from harness.generation import generate_responses

    prompts = tmp_path / "requests.jsonl"
    rows = [{"prompt": f"Tell me about the {w} module.", "label": "benign"} for w in ("json", "os", "re", "sys")]
    rows.append({"prompt": "Explain how to pick a lock to break into a house.", "label": "harmful"})
    prompts.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    spec = CalibrationSpec(f"chat:{prompts}", n_samples=2, seq_len=32, batch_size=2, seed=0)
    data = load_calibration(spec, toy_chat.tokenizer, toy_chat.model)
    again = load_calibration(spec, toy_chat.tokenizer, toy_chat.model)
    assert data.fingerprint == again.fingerprint  # greedy answers: same text, same windows
    from harness.calibration_data import calibration_text

    text = calibration_text(spec.source, toy_chat.tokenizer, toy_chat.model, seed=0)
    assert rows[-1]["prompt"] not in text  # harmful requests are never used
    answer = generate_responses(toy_chat.model, toy_chat.tokenizer, [rows[0]["prompt"]], max_new_tokens=64,
                                progress=False)[0]
    assert rows[0]["prompt"] in text and answer in text
    with pytest.raises(UserError, match="answers its prompts with the model"):
        load_calibration(spec, toy_chat.tokenizer)
