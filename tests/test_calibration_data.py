"""Calibration data: seeded token windows from text files and the toy pretraining text, fingerprinted."""

import pytest
import torch

from harness.calibration_data import CalibrationSpec, load_calibration, parse_span
from harness.errors import UserError
from harness.generation import generate_responses as _REAL_GENERATE


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


def _requests(tmp_path) -> str:
    import json

    path = tmp_path / "requests.jsonl"
    rows = [{"prompt": f"Tell me about the {w} module.", "label": "benign"} for w in ("json", "os", "re", "sys", "io")]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return f"chat:{path}"


class _Counted:
    """The real generator, counted: how the tests see whether the cache answered instead."""

    def __init__(self, monkeypatch):
        import harness.generation

        self.calls = 0

        def counted(*args, **kwargs):
            self.calls += 1
            return _REAL_GENERATE(*args, **kwargs)

        monkeypatch.setattr(harness.generation, "generate_responses", counted)


def test_chat_text_is_cached_and_read_back_without_generating(toy_chat, tmp_path, monkeypatch):
    import json

    import harness.generation

    cache = tmp_path / "cache"
    spec = CalibrationSpec(_requests(tmp_path), n_samples=2, seq_len=32, batch_size=2, seed=0)
    counted = _Counted(monkeypatch)
    first = load_calibration(spec, toy_chat.tokenizer, toy_chat.model, cache_dir=cache)
    assert counted.calls == 1
    [entry] = list((cache / "calibration-text").iterdir())
    stored = json.loads(entry.read_text(encoding="utf-8"))  # JSON, never a pickle
    assert stored["key"]["seed"] == 0 and stored["key"]["model"].startswith("sha256:")
    mtime = entry.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the cached text should have been used")

    monkeypatch.setattr(harness.generation, "generate_responses", refuse)
    again = load_calibration(spec, toy_chat.tokenizer, toy_chat.model, cache_dir=cache)
    assert again.fingerprint == first.fingerprint and again.source_sha256 == first.source_sha256
    from harness.calibration_data import calibration_text

    text = calibration_text(spec.source, toy_chat.tokenizer, toy_chat.model, seed=0,
                            min_tokens=2 * spec.n_samples * spec.seq_len, cache_dir=cache)
    assert text.encode("utf-8") == stored["text"].encode("utf-8")
    assert entry.stat().st_mtime_ns == mtime  # read, not rewritten
    # the uncached text is byte-identical to what the cache gave back
    counted = _Counted(monkeypatch)
    fresh = calibration_text(spec.source, toy_chat.tokenizer, toy_chat.model, seed=0,
                             min_tokens=2 * spec.n_samples * spec.seq_len, cache_dir=None)
    assert counted.calls == 1 and fresh.encode("utf-8") == text.encode("utf-8")


def test_chat_cache_key_follows_the_settings(toy_chat, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    source = _requests(tmp_path)
    counted = _Counted(monkeypatch)
    for seed in (0, 1):
        load_calibration(CalibrationSpec(source, n_samples=2, seq_len=32, seed=seed), toy_chat.tokenizer,
                         toy_chat.model, cache_dir=cache)
    load_calibration(CalibrationSpec(source, n_samples=1, seq_len=32, seed=0), toy_chat.tokenizer, toy_chat.model,
                     cache_dir=cache)  # asks for other min_tokens
    assert counted.calls == 3 and len(list((cache / "calibration-text").iterdir())) == 3
    from harness.models import load_model

    toy_base = load_model("toy-base", device="cpu")  # another model, the same tokenizer and requests
    load_calibration(CalibrationSpec(source, n_samples=2, seq_len=32, seed=0), toy_base.tokenizer, toy_base.model,
                     cache_dir=cache)
    assert counted.calls == 4 and len(list((cache / "calibration-text").iterdir())) == 4


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]", '{"key": {}, "text": "stale"}', b"\xff\xfe\x00"])
def test_a_damaged_chat_cache_is_ignored_and_remade(toy_chat, tmp_path, monkeypatch, caplog, damage):
    import json

    cache = tmp_path / "cache"
    spec = CalibrationSpec(_requests(tmp_path), n_samples=2, seq_len=32, seed=0)
    good = load_calibration(spec, toy_chat.tokenizer, toy_chat.model, cache_dir=cache)
    [entry] = list((cache / "calibration-text").iterdir())
    text = json.loads(entry.read_text(encoding="utf-8"))["text"]
    entry.write_bytes(damage if isinstance(damage, bytes) else damage.encode("utf-8"))
    counted = _Counted(monkeypatch)
    with caplog.at_level("WARNING", logger="harness.calibration_data"):
        again = load_calibration(spec, toy_chat.tokenizer, toy_chat.model, cache_dir=cache)
    assert counted.calls == 1 and again.fingerprint == good.fingerprint
    assert "generating it again" in caplog.text
    assert json.loads(entry.read_text(encoding="utf-8"))["text"] == text  # rewritten whole


def test_chat_cache_follows_the_shared_cache_rule(toy_chat, tmp_path, monkeypatch):
    """``auto`` is $SAFEQUANT_CACHE_DIR (the audit's --cache-dir rule); ``none`` there turns it off."""
    from harness.store import resolve_cache_dir

    spec = CalibrationSpec(_requests(tmp_path), n_samples=2, seq_len=32, seed=0)
    monkeypatch.setenv("SAFEQUANT_CACHE_DIR", str(tmp_path / "env-cache"))
    assert resolve_cache_dir() == tmp_path / "env-cache"
    load_calibration(spec, toy_chat.tokenizer, toy_chat.model)
    assert len(list((tmp_path / "env-cache" / "calibration-text").iterdir())) == 1
    monkeypatch.setenv("SAFEQUANT_CACHE_DIR", "none")
    counted = _Counted(monkeypatch)
    load_calibration(spec, toy_chat.tokenizer, toy_chat.model)
    assert counted.calls == 1  # not read from env-cache
    monkeypatch.delenv("SAFEQUANT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "safequant"
    assert resolve_cache_dir("off") is None and resolve_cache_dir(None) is None
    assert resolve_cache_dir(tmp_path / "mine") == tmp_path / "mine"


@pytest.mark.slow
def test_audit_and_quantize_share_the_chat_text(tmp_path, monkeypatch):
    """The wiring: an audit with --cache-dir answers chat:calibration once and keeps it there; a
    later `safequant quantize` of the same model ($SAFEQUANT_CACHE_DIR, the same rule) reads it."""
    import json

    import harness.generation
    from harness.cli import main

    cache = tmp_path / "cache"
    calib = ["--calib-text", "chat:calibration", "--calib-samples", "4", "--calib-len", "64"]
    assert main(["-q", "audit", "--model", "toy-chat", "--variants", "fp", "gptq:w4a16", *calib, "--limit", "2",
                 "--max-new-tokens", "8", "--judges", "refusal-phrases", "--no-probes", "--no-report",
                 "--no-first-token", "--bootstrap", "100", "--ppl-max-tokens", "128", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "run")]) == 0
    [entry] = list((cache / "calibration-text").iterdir())
    audited = json.loads((tmp_path / "run" / "summary.json").read_text())["variants"][1]["quantizer"]["calibration"]

    def refuse(*args, **kwargs):
        raise AssertionError("the audit's cached answers should have been used")

    monkeypatch.setattr(harness.generation, "generate_responses", refuse)
    monkeypatch.setenv("SAFEQUANT_CACHE_DIR", str(cache))
    assert main(["-q", "quantize", "--model", "toy-chat", "--method", "gptq", "--scheme", "w4a16", *calib,
                 "--out", str(tmp_path / "variant")]) == 0
    saved = json.loads((tmp_path / "variant" / "variant.json").read_text())["calibration"]
    assert saved["fingerprint"] == audited["fingerprint"] and len(list(entry.parent.iterdir())) == 1


def test_chat_cache_hits_for_a_tokenizer_without_a_pad_token(toy_chat, tmp_path, monkeypatch):
    """Generation gives a pad-less tokenizer a pad token, which its fingerprint sees: the key is made
    on the tokenizer as generation leaves it, so the second load of a process still hits."""
    import copy

    tokenizer = copy.deepcopy(toy_chat.tokenizer)
    tokenizer.pad_token = None
    spec = CalibrationSpec(_requests(tmp_path), n_samples=2, seq_len=32, seed=0)
    counted = _Counted(monkeypatch)
    first = load_calibration(spec, tokenizer, toy_chat.model, cache_dir=tmp_path / "cache")
    again = load_calibration(spec, tokenizer, toy_chat.model, cache_dir=tmp_path / "cache")
    assert counted.calls == 1 and again.fingerprint == first.fingerprint
