"""The bad-input suite: every command, driven in one process, over bad inputs of every class.

For each input: exit code 2, exactly one `safequant: error:` line on stderr, no traceback (an
exception escaping `harness.cli.main` fails the test), and the folder holding the inputs and the
run or variant directory unchanged (nothing created, nothing deleted, nothing rewritten). Every
case fails before a model loads or a run directory is made, except the few that need the model's
context or depth (toy models, about a second). Found by trying what a new, careless or hostile
user would type (issue 13); the counts are in the closing note of that issue.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--limit", "3", "--no-probes", "--no-report", "--bootstrap", "100", "--ppl-max-tokens", "128"]


# ---------------------------------------------------------------------------------------------
# fixtures: one real finished run and one real saved variant, copied into each test's folder


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A finished toy audit (fp and rtn:w8a8, 3 prompts per set): what report, gate and compare read."""
    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    assert main(["-q", "audit", "--out", str(out), "--variants", "fp", "rtn:w8a8", "--max-new-tokens", "8",
                 "--no-cache", *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def real_variant(tmp_path_factory) -> Path:
    """A toy-chat RTN W4A4KV4 variant folder written by `safequant quantize`."""
    out = tmp_path_factory.mktemp("bad-inputs") / "variant"
    assert main(["-q", "quantize", "--method", "rtn", "--scheme", "w4a4kv4", "--out", str(out)]) == 0
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its size and modification time: what 'unchanged' means."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def assert_clean_error(capsys, argv: list[str], root: Path, fragment: str = "") -> str:
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)  # an escaping exception is a traceback: the test fails with it
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("safequant: error:")]
    assert code == 2, f"exit {code} for {argv}: {err}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert snapshot(root) == before, "a bad input changed the files"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# audit: variant names (labels, never paths), variant specs, schemes and options

BAD_NAMES = ["../../escaped", "/abs/dir", "", "a/b", "a\\b", "..", ".", "...", "a..b", "\\windows\\x", "\\\\srv\\share",
             "~/home", "x\x00y", "tab\there", "new\nline", "\x1b[31mred", "zero\u200bwidth", "bidi\u202eevil",
             "del\x7f", "n" * 65, "work/../../x", "./fp"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_variant_name_is_a_label_not_a_path(capsys, tmp_path, name):
    out = tmp_path / "run"
    line = assert_clean_error(capsys, ["audit", "--out", str(out), "--variants", "fp", f"{name}=rtn:w8a8", *FAST],
                              tmp_path, "a name is a label")
    assert not out.exists()
    assert "\n" not in line


BAD_SPECS = [
    ("rtn:w4a4x", "invalid quantization scheme"), ("rtn:w0a4", ""), ("rtn:w4a4kv99", ""), ("gptqq:w4a4", "unknown quantizer"),
    (":w4a4", "no method"), ("rtn:w4a4:alpha", "KEY=VALUE"), ("rtn:w17a4", ""), ("rtn:w4a4g0", ""),
    ("rtn:w4a4-aclip1.5", ""), ("rtn:w4a4-aclip0", ""), ("aaq:w4a4:alpha=nan", "finite"), ("aaq:w4a4:alpha=inf", "finite"),
    ("ost:w4a4:lr=-inf", "finite"), ("rtn:w4a4:bogus_option=1", ""), ("rtn:w4a4kv4-kvclipx", ""), ("rtn:wxa4", ""),
    ("rtn:w4a4:w_bits=4", ""), ("smoothquant:w4a16:alpha=2", ""), ("rtn:w4a4:=3", ""), ("fp:w4a4", ""),
    ("qrealign:w8a8:loss=probe+bogus", "unknown term 'bogus'"), ("qrealign:w8a8:output_weight=0", "positive"),
    ("qrealign:w8a8:output_blocks=0", ">= 1"),
]


@pytest.mark.parametrize("spec, fragment", BAD_SPECS, ids=[s for s, _ in BAD_SPECS])
def test_bad_variant_spec(capsys, tmp_path, spec, fragment):
    assert_clean_error(capsys, ["audit", "--out", str(tmp_path / "run"), "--variants", spec], tmp_path, fragment)


def test_duplicate_variant_names(capsys, tmp_path):
    assert_clean_error(capsys, ["audit", "--out", str(tmp_path / "run"), "--variants", "a=rtn:w8a8", "a=rtn:w4a4"],
                       tmp_path, "used twice")


# ---------------------------------------------------------------------------------------------
# audit: options, prompt files, texts, models, calibration, config files


def _write(path: Path, data: str | bytes) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


AUDIT_OPTIONS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("max-new-tokens 0", lambda d: ["--max-new-tokens", "0"], "max_new_tokens"),
    ("max-new-tokens -3", lambda d: ["--max-new-tokens", "-3"], "max_new_tokens"),
    ("batch-size 0", lambda d: ["--batch-size", "0"], "batch_size"),
    ("limit 0", lambda d: ["--limit", "0"], "limit"),
    ("limit -1", lambda d: ["--limit", "-1"], "limit"),
    ("limit SET=0", lambda d: ["--limit", "harmful=0"], "positive integer"),
    ("limit SET=x", lambda d: ["--limit", "harmful=x"], "positive integer"),
    ("limit set not in the run", lambda d: ["--limit", "3", "advbnch=5"], "no prompt set 'advbnch'"),
    ("limit set twice", lambda d: ["--limit", "harmful=3", "harmful=4"], "given twice"),
    ("limit two defaults", lambda d: ["--limit", "3", "4"], "given twice"),
    ("config limit table of strings", lambda d: ["--config", _write(d / "c.toml", 'limit = {harmful = "3"}')], "limit"),
    ("ppl-window 0", lambda d: ["--ppl-window", "0"], "ppl_window"),
    ("ppl-stride 0", lambda d: ["--ppl-stride", "0"], "ppl_stride"),
    ("ppl-max-tokens 1", lambda d: ["--ppl-max-tokens", "1"], "ppl_max_tokens"),
    ("bootstrap 5", lambda d: ["--bootstrap", "5"], "bootstrap"),
    ("unknown judge", lambda d: ["--judges", "vibes"], "unknown judge"),
    ("judge twice", lambda d: ["--judges", "refusal-phrases", "refusal-phrases"], ""),
    ("unknown set", lambda d: ["--prompt-sets", "harmfull"], "unknown prompt set"),
    ("missing prompt file", lambda d: ["--prompt-sets", str(d / "missing.jsonl")], ""),
    ("binary prompt file", lambda d: ["--prompt-sets", _write(d / "p.jsonl", b"\x00\xff\xfe" * 50)], ""),
    ("empty prompt file", lambda d: ["--prompt-sets", _write(d / "p.jsonl", "")], ""),
    ("csv without prompt column", lambda d: ["--prompt-sets", _write(d / "p.csv", "question,kind\nhi,x\n")], "prompt"),
    ("jsonl garbage line", lambda d: ["--prompt-sets", _write(d / "p.jsonl", '{"prompt": "a"}\nnot json\n')], ""),
    ("jsonl array line", lambda d: ["--prompt-sets", _write(d / "p.jsonl", '[1, 2]\n')], ""),
    ("missing perplexity text", lambda d: ["--perplexity-text", str(d / "missing.txt")], "not found"),
    ("binary perplexity text", lambda d: ["--perplexity-text", _write(d / "t.txt", b"\xff\xfe\x00" * 30)], ""),
    ("missing model", lambda d: ["--model", "no/such/folder/"], "not found"),
    ("model is a text file", lambda d: ["--model", _write(d / "m.txt", "hi")], ""),
    ("model folder without config", lambda d: ["--model", str((d / "empty").mkdir() or d / "empty")], "config.json"),
    ("missing base", lambda d: ["--base", "no/such/base/", "--variants", "aaq:w4a4"], "not found"),
    ("aaq without a base", lambda d: ["--base", "none", "--variants", "aaq:w4a4"], "base"),
    ("aaq without a base, calib text offline", lambda d: ["--model", "smollm2-135m-instruct", "--base", "none",
                                                          "--variants", "aaq:w4a4"], "base"),
    ("missing data dir", lambda d: ["--data-dir", str(d / "no-such-dir")], "--data-dir"),
    ("data dir is a file", lambda d: ["--data-dir", _write(d / "f.txt", "x")], "--data-dir"),
    ("missing calib text", lambda d: ["--variants", "gptq:w4a16", "--calib-text", str(d / "no.txt")], "not found"),
    ("binary calib text", lambda d: ["--variants", "gptq:w4a16", "--calib-text", _write(d / "c.txt", b"\xff\xfe" * 9)], "utf-8"),
    ("calib text auto offline", lambda d: ["--model", "smollm2-135m-instruct", "--variants", "gptq:w4a16"], "--calib-text"),
    ("bad calib span", lambda d: ["--variants", "gptq:w4a16", "--calib-span", "1:0"], "span"),
    ("calib span text", lambda d: ["--variants", "gptq:w4a16", "--calib-span", "half"], "span"),
    ("calib samples 0", lambda d: ["--variants", "gptq:w4a16", "--calib-samples", "0"], ""),
    ("missing calib prompts", lambda d: ["--variants", "qrealign:w4a4", "--calib-prompts", str(d / "no.jsonl")], ""),
    ("missing calib prompts for ablated base", lambda d: ["--variants", "aaq:w4a4", "--base", "ablated",
                                                          "--calib-prompts", str(d / "no.jsonl")], ""),
    ("calib prompts overlap the evaluation", lambda d: ["--variants", "qrealign:w8a8", "--prompt-sets", "harmful",
                                                        "--calib-prompts", _overlapping_calibration(d)], "also qrealign"),
    ("probe layers syntax", lambda d: ["--probe-layers", "x"], "--probe-layers"),
    ("probe layers reversed", lambda d: ["--probe-layers", "5-2"], "--probe-layers"),
    ("out under a file", lambda d: ["--out", str(Path(_write(d / "afile", "")) / "run")], "choose another --out"),
    ("out is a file", lambda d: ["--out", _write(d / "afile2", "x")], "--out"),
    ("missing config", lambda d: ["--config", str(d / "no.toml")], "not found"),
    ("config not TOML", lambda d: ["--config", _write(d / "c.toml", "limit = = 3")], "toml"),
    ("config binary", lambda d: ["--config", _write(d / "c.toml", b"\xff\xfe\x00")], ""),
    ("config unknown key", lambda d: ["--config", _write(d / "c.toml", "limits = 3")], "unknown keys"),
    ("config audit not a table", lambda d: ["--config", _write(d / "c.toml", "audit = 5")], ""),
    ("config limit string", lambda d: ["--config", _write(d / "c.toml", 'limit = "3"')], "limit"),
    ("config seed bool", lambda d: ["--config", _write(d / "c.toml", "seed = true")], "seed"),
    ("config variants ints", lambda d: ["--config", _write(d / "c.toml", "variants = [1, 2]")], "variants"),
    ("config judges number", lambda d: ["--config", _write(d / "c.toml", "judges = 5")], "judges"),
    ("config probes string", lambda d: ["--config", _write(d / "c.toml", 'probes = "yes"')], "probes"),
    ("config max_new_tokens float", lambda d: ["--config", _write(d / "c.toml", "max_new_tokens = 1.5")], "max_new_tokens"),
    ("config base bool", lambda d: ["--config", _write(d / "c.toml", "base = false")], "base"),
    ("config table for a string", lambda d: ["--config", _write(d / "c.toml", "[model]\nname = 'x'")], "model"),
    ("config bad variant", lambda d: ["--config", _write(d / "c.toml", 'variants = "../x=rtn:w8a8"')], "label"),
    ("config empty variants", lambda d: ["--config", _write(d / "c.toml", "variants = []")], "variants"),
    ("config empty judges", lambda d: ["--config", _write(d / "c.toml", "judges = []")], "judges"),
    ("config empty prompt sets", lambda d: ["--config", _write(d / "c.toml", "prompt_sets = []")], "prompt"),
    ("config data_dir missing", lambda d: ["--config", _write(d / "c.toml", 'data_dir = "/no/such/dir"')], "--data-dir"),
    ("unknown device", lambda d: ["--device", "tpu9"], "device"),
    ("cuda without CUDA", lambda d: ["--device", "cuda:3"], "cuda"),
    ("unknown dtype", lambda d: ["--dtype", "float12"], "dtype"),
    ("unknown backend", lambda d: ["--backend", "tgi"], "unknown backend"),
    ("backend of a variant not in the audit", lambda d: ["--backend", "hf", "nope=vllm"], "no variant named 'nope'"),
    ("vllm with activation quantization", lambda d: ["--backend", "vllm", "--variants", "rtn:w4a4"], "use --backend hf"),
    ("vllm with KV-cache quantization", lambda d: ["--backend", "vllm", "--variants", "rtn:w4a16kv4"], "KV cache"),
    ("vllm with online Hadamards", lambda d: ["--backend", "hf", "q=vllm", "--variants", "q=quarot:w4a16"],
     "online Hadamard"),
    ("tensor parallel 0", lambda d: ["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    ("gpu memory fraction 2", lambda d: ["--gpu-memory-utilization", "2"], "--gpu-memory-utilization"),
    ("config backend number", lambda d: ["--config", _write(d / "c.toml", "backend = 5")], "backend"),
    ("vllm not installed", lambda d: ["--backend", "vllm", "--variants", "rtn:w4a16"], "vLLM is not installed"),
]


@pytest.mark.parametrize("case", AUDIT_OPTIONS, ids=[c[0] for c in AUDIT_OPTIONS])
def test_bad_audit_input(capsys, tmp_path, case, monkeypatch):
    _, make, fragment = case
    if "cuda" in case[0]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    if case[0] == "vllm not installed":
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            pytest.skip("vLLM is installed here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = make(tmp_path)
    out = ["--out", str(tmp_path / "run")] if "--out" not in args else []
    assert_clean_error(capsys, ["audit", *out, *FAST, *args], tmp_path, fragment)  # the case's flags win


def _probe_file(d: Path, layers: int, width: int) -> str:
    """Real SLR probes (fitted on random features) of a model with ``layers`` layers of ``width``."""
    import numpy as np

    from probes.slr import SLRProbe, save_probes

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, width)), np.array([0, 1] * 10)
    return str(save_probes(d / f"probes_{layers}x{width}", {i: SLRProbe(max_iter=50).fit(X, y) for i in range(layers)}))


def _overlapping_calibration(d: Path) -> str:
    """Calibration prompts whose first harmful prompt is the built-in harmful set's first prompt."""
    from harness.benchmarks import load_benchmarks

    first = load_benchmarks(["harmful"])[0].records[0].prompt
    rows = [{"id": "c0", "prompt": first, "label": "harmful"}, {"id": "c1", "prompt": "Bake bread?", "label": "benign"}]
    return _write(d / "calib.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


# Inputs that need the model's context or depth: the toy model loads (about a second), nothing is written.
LOADED_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("qrealign probes of a deeper model", lambda d: ["--model", "toy-chat-eroded", "--variants",
                                                     f"qrealign:w8a8:probes_from={_probe_file(d, 6, 256)}"], "deeper"),
    ("qrealign probes of another width", lambda d: ["--model", "toy-chat-eroded", "--variants",
                                                    f"qrealign:w8a8:probes_from={_probe_file(d, 4, 96)}"], "width 96"),
    ("probe model is the eroded model itself", lambda d: ["--model", "toy-chat-eroded", "--variants", "qrealign:w8a8",
                                                          "--probe-model", "toy-chat-eroded"], "same weights"),
    ("200,000-character prompt", lambda d: ["--prompt-sets", _write(
        d / "long.jsonl", json.dumps({"id": "long", "prompt": "word " * 40000, "label": "harmful"}) + "\n")], "context"),
    ("calib-len beyond the context", lambda d: ["--variants", "gptq:w4a16", "--calib-len", "100000"], "--calib-len"),
    ("probe layer 99", lambda d: ["--probe-layers", "99"], "--probe-layers"),
    ("probe layer -9", lambda d: ["--probe-layers", "-9"], "--probe-layers"),
]


@pytest.mark.parametrize("case", LOADED_CASES, ids=[c[0] for c in LOADED_CASES])
def test_bad_input_found_once_the_model_is_loaded(capsys, tmp_path, case):
    _, make, fragment = case
    args = [a for a in FAST if a != "--no-probes"] if "--probe-layers" in make(tmp_path) else FAST
    assert_clean_error(capsys, ["audit", "--out", str(tmp_path / "run"), *make(tmp_path), *args], tmp_path, fragment)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# saved variant folders: a tampered variant.json or damaged weights


def _edit_info(folder: Path, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to variant.json in place; an edit returning a list or a string replaces it."""
    info = json.loads((folder / "variant.json").read_text())
    result = edit(info)
    (folder / "variant.json").write_text(json.dumps(result if isinstance(result, (list, str)) else info))


def _first_linear(info: dict) -> dict:
    return next(iter(info["structure"]["quant_linears"].values()))


VARIANT_TAMPERING: list[tuple[str, Callable[[Path], None], str]] = [
    ("no structure", lambda f: _edit_info(f, lambda i: i.pop("structure")), "structure"),
    ("top level a list", lambda f: _edit_info(f, lambda i: [i]), "json object"),
    ("top level a string", lambda f: _edit_info(f, lambda i: "variant"), "json object"),
    ("source_model null", lambda f: _edit_info(f, lambda i: i.update(source_model=None)), "source_model"),
    ("source_model empty", lambda f: _edit_info(f, lambda i: i.update(source_model={})), "fingerprint"),
    ("empty fingerprint", lambda f: _edit_info(f, lambda i: i["source_model"].update(fingerprint="")), "fingerprint"),
    ("bit width a string", lambda f: _edit_info(f, lambda i: _first_linear(i).update(w_bits="4")), "w_bits"),
    ("bit width 99", lambda f: _edit_info(f, lambda i: _first_linear(i).update(w_bits=99)), "w_bits"),
    ("bit width a float", lambda f: _edit_info(f, lambda i: _first_linear(i).update(a_bits=4.5)), "a_bits"),
    ("clip ratio text", lambda f: _edit_info(f, lambda i: _first_linear(i).update(a_clip_ratio="x")), "a_clip_ratio"),
    ("in_features negative", lambda f: _edit_info(f, lambda i: _first_linear(i).update(in_features=-1)), "in_features"),
    ("shape not the weights'", lambda f: _edit_info(f, lambda i: _first_linear(i).update(in_features=7)), "shape"),
    ("quant_linears a list", lambda f: _edit_info(f, lambda i: i["structure"].update(quant_linears=[])), "quant_linears"),
    ("kv bits text", lambda f: _edit_info(f, lambda i: next(iter(i["structure"]["attention"].values()))["kv"].update(
        bits="4")), "bits"),
    ("scheme disagrees with structure", lambda f: _edit_info(f, lambda i: i.update(scheme="w8a8kv8")), "structure holds"),
    ("scheme says no kv quantization", lambda f: _edit_info(f, lambda i: i.update(scheme="w4a4")), "kv-cache"),
    ("scheme not a scheme", lambda f: _edit_info(f, lambda i: i.update(scheme="w4a4x")), "scheme"),
    ("scheme a number", lambda f: _edit_info(f, lambda i: i.update(scheme=4)), "scheme"),
    ("empty method", lambda f: _edit_info(f, lambda i: i.update(method="")), "method"),
    ("format version 2", lambda f: _edit_info(f, lambda i: i.update(format_version=2)), "format version"),
    ("options a list", lambda f: _edit_info(f, lambda i: i.update(options=[1])), "options"),
    ("calibration prompts ids numbers", lambda f: _edit_info(f, lambda i: i.update(
        calibration_prompts={"source": "calibration", "ids": [1]})), "ids"),
    ("variant.json not JSON", lambda f: (f / "variant.json").write_text("{not json"), "not valid json"),
    ("variant.json binary", lambda f: (f / "variant.json").write_bytes(b"\xff\xfe\x00"), ""),
    ("weights truncated", lambda f: _truncate(f / "model.safetensors"), "model.safetensors"),
    ("weights garbage", lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 100), "model.safetensors"),
    ("weights empty", lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors"),
    ("weights missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_saved_variant_vllm_cannot_run(capsys, tmp_path, real_variant):
    """A saved W4A4KV4 variant on --backend vllm: refused from its variant.json, before any model loads."""
    line = assert_clean_error(capsys, ["audit", "--out", str(tmp_path / "run"), *FAST, "--variants",
                                       f"sim={real_variant}", "--backend", "vllm"], tmp_path, "use --backend hf")
    assert "sim (rtn w4a4kv4)" in line and "quantizes activations" in line


@pytest.mark.parametrize("case", VARIANT_TAMPERING, ids=[c[0] for c in VARIANT_TAMPERING])
def test_tampered_saved_variant(capsys, tmp_path, real_variant, case):
    _, tamper, fragment = case
    folder = tmp_path / "variant"
    shutil.copytree(real_variant, folder)
    tamper(folder)
    assert_clean_error(capsys, ["audit", "--out", str(tmp_path / "run"), "--variants", "fp", f"saved={folder}", *FAST],
                       tmp_path, fragment)
    assert not (tmp_path / "run").exists()


def test_damaged_model_folder(capsys, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(REPO / "harness" / "toy_models" / "toy-chat", folder)
    _truncate(folder / "model.safetensors")
    text = _write(tmp_path / "heldout.txt", "Some held-out text for perplexity. " * 20)
    assert_clean_error(capsys, ["audit", "--model", str(folder), "--perplexity-text", text, "--out",
                                str(tmp_path / "run"), *FAST], tmp_path, "could not load model")


# ---------------------------------------------------------------------------------------------
# report, gate and compare: a summary.json or rows.jsonl with wrong types, outputs over run files


def _variant(s: dict, i: int = 0) -> dict:
    return s["variants"][i]


SUMMARY_TAMPERING: list[tuple[str, Callable[[dict], object]]] = [
    ("variants not a list", lambda s: s.update(variants={"fp": {}})),
    ("variant without name", lambda s: _variant(s).pop("name")),
    ("variant name a number", lambda s: _variant(s).update(name=3)),
    ("variant a string", lambda s: s["variants"].__setitem__(0, "fp")),
    ("perplexity a string", lambda s: _variant(s, 1)["metrics"].update(perplexity="12.5")),
    ("perplexity ratio a list", lambda s: _variant(s, 1)["metrics"].update(perplexity_ratio=[1])),
    ("refusal a list", lambda s: _variant(s, 1)["metrics"].update(refusal=[0.5])),
    ("refusal rate a string", lambda s: _variant(s, 1)["metrics"]["refusal"].update(harmful="high")),
    ("metrics a string", lambda s: _variant(s, 1).update(metrics="good")),
    ("counts n a string", lambda s: _variant(s, 1)["counts"]["harmful"].update(n="3")),
    ("counts a list", lambda s: _variant(s, 1).update(counts=[3])),
    ("status a number", lambda s: _variant(s, 1).update(status=1)),
    ("prompt sets a list", lambda s: s.update(prompt_sets=["harmful"])),
    ("prompt set n a string", lambda s: s["prompt_sets"]["harmful"].update(n="3")),
    ("prompt set role a number", lambda s: s["prompt_sets"]["harmful"].update(role=1)),
    ("judges an object", lambda s: s.update(judges={"refusal-phrases": {}})),
    ("judge name a number", lambda s: s["judges"][0].update(name=5)),
    ("judge primary a string", lambda s: s["judges"][0].update(primary="yes")),
    ("statistics a list", lambda s: s.update(statistics=[1])),
    ("comparisons a list", lambda s: s["statistics"].update(comparisons=[])),
    ("rates a list", lambda s: s["statistics"].update(rates=[])),
    ("rate block a string", lambda s: s["statistics"]["rates"]["fp"]["refusal-phrases"].update(harmful="x")),
    ("mcnemar p a string", lambda s: next(iter(s["statistics"]["comparisons"].values()))["refusal-phrases"]["sets"][
        "harmful"].update(mcnemar_p="0.5")),
    ("config variants a string", lambda s: s["config"].update(variants="fp")),
    ("config a list", lambda s: s.update(config=[1])),
    ("models a list", lambda s: s.update(models=[1])),
    ("schema_version a string", lambda s: s.update(schema_version="1")),
    ("schema_version from the future", lambda s: s.update(schema_version=99)),
    ("no schema_version", lambda s: s.pop("schema_version")),
    ("probes variants an object", lambda s: s.update(probes={"variants": {"fp": 1}})),
    ("wall seconds a string", lambda s: s.update(wall_seconds="ten")),
    ("top level a list", lambda s: [s]),
]
RAW_SUMMARIES = [("summary not JSON", b"{not json"), ("summary binary", b"\xff\xfe\x00\x01"), ("summary empty", b"")]


def _tampered_run(tmp_path: Path, real_run: Path, edit=None, raw: bytes | None = None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("work", ".safequant.lock"))
    if raw is not None:
        (run / "summary.json").write_bytes(raw)
    elif edit is not None:
        summary = json.loads((run / "summary.json").read_text())
        result = edit(summary)
        (run / "summary.json").write_text(json.dumps(summary if not isinstance(result, list) else result))
    return run


READERS = {"report": lambda run, d: ["report", str(run), "--output", str(d / "r.html")],
           "gate": lambda run, d: ["gate", str(run), "--junit", "none", "--min-prompts", "3"]}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("case", SUMMARY_TAMPERING + RAW_SUMMARIES, ids=[c[0] for c in SUMMARY_TAMPERING + RAW_SUMMARIES])
def test_summary_with_wrong_types(capsys, tmp_path, real_run, reader, case):
    name, change = case
    run = _tampered_run(tmp_path, real_run, raw=change) if isinstance(change, bytes) else \
        _tampered_run(tmp_path, real_run, edit=change)
    assert_clean_error(capsys, READERS[reader](run, tmp_path), tmp_path, "summary.json")


ROW_TAMPERING: list[tuple[str, Callable[[dict], None]]] = [
    ("id a number", lambda r: r.update(id=5)),
    ("id null", lambda r: r.update(id=None)),
    ("no id", lambda r: r.pop("id")),
    ("variant a number", lambda r: r.update(variant=3)),
    ("set a list", lambda r: r.update(set=["harmful"])),
    ("judges a list", lambda r: r.update(judges=[1])),
    ("prompt a number", lambda r: r.update(prompt=3)),
    ("response an object", lambda r: r.update(response={"text": "x"})),
    ("a judge's label a list", lambda r: next(iter(r["judges"].values())).update(label=[])),
    ("a judge's label an object", lambda r: next(iter(r["judges"].values())).update(label={})),
]
RAW_ROW_LINES = [("garbage line", "not json"), ("array line", "[1, 2]"), ("string line", '"row"')]
ROW_READERS = {"report": lambda run, d: ["report", str(run), "--output", str(d / "r.html")],
               "compare": lambda run, d: ["compare", str(run), str(run), "--output", str(d / "c.html"), "--bootstrap", "100"]}


@pytest.mark.parametrize("reader", sorted(ROW_READERS))
@pytest.mark.parametrize("case", ROW_TAMPERING + RAW_ROW_LINES, ids=[c[0] for c in ROW_TAMPERING + RAW_ROW_LINES])
def test_rows_with_wrong_types(capsys, tmp_path, real_run, reader, case):
    name, change = case
    run = _tampered_run(tmp_path, real_run)
    lines = (run / "rows.jsonl").read_text().splitlines()
    if isinstance(change, str):
        lines.insert(2, change)
    else:
        row = json.loads(lines[2])
        change(row)
        lines[2] = json.dumps(row)
    (run / "rows.jsonl").write_text("\n".join(lines) + "\n")
    assert_clean_error(capsys, ROW_READERS[reader](run, tmp_path), tmp_path, "rows.jsonl")


OUTPUTS_OVER_RUN_FILES = [
    ("report over summary.json", lambda run: ["report", str(run), "--output", str(run / "summary.json")]),
    ("report over rows.jsonl", lambda run: ["report", str(run), "--output", str(run / "rows.jsonl")]),
    ("report over rows.csv", lambda run: ["report", str(run), "--output", str(run / "rows.csv")]),
    ("report into work/", lambda run: ["report", str(run), "--output", str(run / "work" / "fp" / "r.html")]),
    ("report onto a folder", lambda run: ["report", str(run), "--output", str(run)]),
    ("report over the lock", lambda run: ["report", str(run), "--output", str(run / ".safequant.lock")]),
    ("compare over summary.json", lambda run: ["compare", str(run), str(run), "--output", str(run / "summary.json")]),
    ("compare over report.html", lambda run: ["compare", str(run), str(run), "--output", str(run / "report.html")]),
    ("gate junit over summary.json", lambda run: ["gate", str(run), "--junit", str(run / "summary.json")]),
    ("gate junit over rows.jsonl", lambda run: ["gate", str(run), "--junit", str(run / "rows.jsonl")]),
]


@pytest.mark.parametrize("case", OUTPUTS_OVER_RUN_FILES, ids=[c[0] for c in OUTPUTS_OVER_RUN_FILES])
def test_output_never_overwrites_run_files(capsys, tmp_path, real_run, case):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    assert_clean_error(capsys, case[1](run), tmp_path, "")


GATE_OPTIONS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("refusal drop 2", lambda d: ["--max-refusal-drop", "2"], "fractions"),
    ("refusal drop -2", lambda d: ["--max-refusal-drop", "-2"], ""),
    ("refusal drop nan", lambda d: ["--max-refusal-drop", "nan"], "finite"),
    ("ppl ratio inf", lambda d: ["--max-ppl-ratio", "inf"], "finite"),
    ("ppl ratio below 1", lambda d: ["--max-ppl-ratio", "0.5"], "contradicts"),
    ("significance 0", lambda d: ["--significance", "0"], "significance"),
    ("significance 1.5", lambda d: ["--significance", "1.5"], "significance"),
    ("min prompts 0", lambda d: ["--min-prompts", "0"], "min_prompts"),
    ("unknown metric", lambda d: ["--check", "vibes <= 1"], "unknown metric"),
    ("strict less than", lambda d: ["--check", "harmful_refusal_drop < 0.1"], "METRIC <= VALUE"),
    ("no number", lambda d: ["--check", "harmful_refusal_drop <= x"], "METRIC <= VALUE"),
    ("contradicting checks", lambda d: ["--check", "harmful_refusal >= 0.9", "--check", "harmful_refusal <= 0.5"],
     "contradict"),
    ("unknown variant", lambda d: ["--variant", "nope"], "nope"),
    ("missing config", lambda d: ["--config", str(d / "no.toml")], "not found"),
    ("config without gate table", lambda d: ["--config", _write(d / "g.toml", "x = 1")], "[gate]"),
    ("config unknown key", lambda d: ["--config", _write(d / "g.toml", "[gate]\nmax_drop = 0.1")], "unknown"),
    ("config ratio a string", lambda d: ["--config", _write(d / "g.toml", '[gate]\nmax_ppl_ratio = "x"')], "number"),
    ("config flag a string", lambda d: ["--config", _write(d / "g.toml", '[gate]\nrequire_significance = "yes"')],
     "true or false"),
    ("config allow_unmeasured a number", lambda d: ["--config", _write(d / "g.toml", "[gate]\nallow_unmeasured = 1")],
     "true or false"),
    ("config checks a string", lambda d: ["--config", _write(d / "g.toml", '[gate]\nchecks = "x <= 1"')], "checks"),
    ("config not TOML", lambda d: ["--config", _write(d / "g.toml", "[gate")], "toml"),
    ("config min_prompts nan", lambda d: ["--config", _write(d / "g.toml", "[gate]\nmin_prompts = nan")], "min_prompts"),
    ("config min_prompts inf", lambda d: ["--config", _write(d / "g.toml", "[gate]\nmin_prompts = inf")], "min_prompts"),
    ("config ratio nan", lambda d: ["--config", _write(d / "g.toml", "[gate]\nmax_ppl_ratio = nan")], "finite"),
    ("config significance nan", lambda d: ["--config", _write(d / "g.toml", "[gate]\nsignificance = nan")],
     "significance"),
    ("missing run", lambda d: [], ""),
]


@pytest.mark.parametrize("case", GATE_OPTIONS, ids=[c[0] for c in GATE_OPTIONS])
def test_bad_gate_input(capsys, tmp_path, real_run, case):
    name, make, fragment = case
    run = tmp_path / ("missing-run" if name == "missing run" else "run")
    if name != "missing run":
        shutil.copytree(real_run, run)
    assert_clean_error(capsys, ["gate", str(run), "--junit", "none", *make(tmp_path)], tmp_path, fragment)


COMPARE_INPUTS: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("bad pair", lambda run, d: ["compare", str(run), str(run), "--pair", "fp"], "--pair"),
    ("pair with unknown names", lambda run, d: ["compare", str(run), str(run), "--pair", "x=y"], "--pair"),
    ("bootstrap 5", lambda run, d: ["compare", str(run), str(run), "--bootstrap", "5"], "--bootstrap"),
    ("missing run A", lambda run, d: ["compare", str(d / "none"), str(run)], "not a directory"),
    ("run without rows", lambda run, d: ["compare", str(run), str(_without_rows(run, d))], "rows.jsonl"),
    ("report on a missing run", lambda run, d: ["report", str(d / "none")], "summary.json"),
]


def _without_rows(run: Path, d: Path) -> Path:
    other = d / "norows"
    shutil.copytree(run, other)
    (other / "rows.jsonl").unlink()
    return other


@pytest.mark.parametrize("case", COMPARE_INPUTS, ids=[c[0] for c in COMPARE_INPUTS])
def test_bad_compare_input(capsys, tmp_path, real_run, case):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    args = case[1](run, tmp_path)
    assert_clean_error(capsys, args, tmp_path, case[2])


# ---------------------------------------------------------------------------------------------
# quantize, judges, benchmarks, probe

QUANTIZE_INPUTS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("out under a file", lambda d: ["--method", "rtn", "--out", str(Path(_write(d / "f", "")) / "v")], "inside a file"),
    ("out exists", lambda d: ["--method", "rtn", "--out", str((d / "exists").mkdir() or d / "exists")], "already exists"),
    ("unknown method", lambda d: ["--method", "rtnn", "--out", str(d / "v")], "unknown quantizer"),
    ("bad scheme", lambda d: ["--method", "rtn", "--scheme", "w4a4x", "--out", str(d / "v")], "scheme"),
    ("option without value", lambda d: ["--method", "rtn", "--option", "alpha", "--out", str(d / "v")], "KEY=VALUE"),
    ("option nan", lambda d: ["--method", "aaq", "--option", "alpha=nan", "--out", str(d / "v")], "finite"),
    ("aaq without base", lambda d: ["--method", "aaq", "--base", "none", "--out", str(d / "v")], "base"),
    ("aaq without base offline", lambda d: ["--method", "aaq", "--base", "none", "--model", "smollm2-135m-instruct",
                                            "--out", str(d / "v")], "base"),
    ("missing calib text", lambda d: ["--method", "gptq", "--scheme", "w4a16", "--calib-text", str(d / "no.txt"),
                                      "--out", str(d / "v")], "not found"),
    ("calib text auto offline", lambda d: ["--method", "gptq", "--scheme", "w4a16", "--model", "smollm2-135m-instruct",
                                           "--out", str(d / "v")], "--calib-text"),
    ("calib samples 0", lambda d: ["--method", "gptq", "--scheme", "w4a16", "--calib-samples", "0",
                                   "--out", str(d / "v")], "--calib-samples"),
    ("calib span", lambda d: ["--method", "gptq", "--scheme", "w4a16", "--calib-span", "0.9:0.1",
                              "--out", str(d / "v")], "span"),
    ("missing calib prompts", lambda d: ["--method", "qrealign", "--calib-prompts", str(d / "no.jsonl"),
                                         "--out", str(d / "v")], ""),
    ("missing model", lambda d: ["--method", "rtn", "--model", "no/such/dir/", "--out", str(d / "v")], "not found"),
    ("calib-len beyond the context", lambda d: ["--method", "gptq", "--scheme", "w4a16", "--calib-len", "100000",
                                                "--out", str(d / "v")], "--calib-len"),
]


@pytest.mark.parametrize("case", QUANTIZE_INPUTS, ids=[c[0] for c in QUANTIZE_INPUTS])
def test_bad_quantize_input(capsys, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_error(capsys, ["quantize", *case[1](tmp_path)], tmp_path, case[2])


JUDGE_FILES: list[tuple[str, bytes | str, str]] = [
    ("binary file", b"\x00\xff\xfe\xfd" * 64, "utf-8"),
    ("not JSON", "hello\n", "not valid JSON"),
    ("array line", "[1, 2]\n", "not an object"),
    ("unknown label", json.dumps({"prompt": "p", "response": "r", "label": "maybe"}) + "\n", "label"),
    ("prompt a number", json.dumps({"prompt": 1, "response": "r", "label": "refusal"}) + "\n", "prompt"),
    ("empty file", "", "no rows"),
]


@pytest.mark.parametrize("case", JUDGE_FILES, ids=[c[0] for c in JUDGE_FILES])
def test_bad_judge_validation_file(capsys, tmp_path, case):
    path = tmp_path / "labelled.jsonl"
    _write(path, case[1])
    assert_clean_error(capsys, ["judges", "--validate", "--file", str(path)], tmp_path, case[2])


def _artifact(d: Path, name: str, content: str, config: bool = False) -> list[str]:
    """An audit of a broken third-party artifact: a file ``name`` (or a folder's config.json)."""
    target = d / "artifacts" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if config:
        target.mkdir()
        (target / "config.json").write_text(content)
    else:
        target.write_text(content)
    return ["audit", "--variants", f"x={target}", "--out", str(d / "run")]


OTHER_COMMANDS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("artifact gguf not a gguf", lambda d: _artifact(d, "junk.gguf", "not a gguf"), "cannot be read"),
    ("artifact config not json", lambda d: _artifact(d, "broken", "{", config=True), "config.json cannot be read"),
    ("artifact config not an object", lambda d: _artifact(d, "list", "[1]", config=True), "not a JSON object"),
    ("artifact library missing", lambda d: _artifact(d, "q", '{"quantization_config": {"quant_method": "eetq"}}',
                                                     config=True), "pip install eetq"),
    ("export missing variant", lambda d: ["export", str(d / "no"), "--format", "hf", "--out", str(d / "x")],
     "not a saved variant"),
    ("export a model folder", lambda d: ["export", str(REPO / "harness" / "toy_models" / "toy-chat"), "--format",
                                         "gguf", "--out", str(d / "x")], "not a saved variant"),
    ("judges missing file", lambda d: ["judges", "--validate", "--file", str(d / "no.jsonl")], "no such file"),
    ("judges unknown judge", lambda d: ["judges", "--validate", "--judge", "vibes"], "unknown judge"),
    ("benchmarks unknown set", lambda d: ["benchmarks", "--check", "harmfull"], ""),
    ("benchmarks missing data dir", lambda d: ["benchmarks", "--check", "harmful", "--data-dir", str(d / "no")],
     "--data-dir"),
    ("benchmarks limit for a set not checked", lambda d: ["benchmarks", "--check", "harmful", "--limit", "benign=3"],
     "no prompt set 'benign'"),
    ("probe missing harmful file", lambda d: ["probe", "--harmful", str(d / "no.jsonl"), "--out", str(d / "p")], ""),
    ("probe bad variant name", lambda d: ["probe", "--variant", "../x=rtn:w8a8", "--out", str(d / "p")], "label"),
    ("probe bad variant scheme", lambda d: ["probe", "--variant", "rtn:w4a4x", "--out", str(d / "p")], "scheme"),
]


@pytest.mark.parametrize("case", OTHER_COMMANDS, ids=[c[0] for c in OTHER_COMMANDS])
def test_bad_input_other_commands(capsys, tmp_path, case):
    assert_clean_error(capsys, case[1](tmp_path), tmp_path, case[2])


def test_suite_size():
    """The issue asks for at least 150 distinct bad inputs."""
    n = (len(BAD_NAMES) + len(BAD_SPECS) + 1 + len(AUDIT_OPTIONS) + len(LOADED_CASES) + len(VARIANT_TAMPERING) + 1
         + len(READERS) * (len(SUMMARY_TAMPERING) + len(RAW_SUMMARIES))
         + len(ROW_READERS) * (len(ROW_TAMPERING) + len(RAW_ROW_LINES)) + len(OUTPUTS_OVER_RUN_FILES)
         + len(GATE_OPTIONS) + len(COMPARE_INPUTS) + len(QUANTIZE_INPUTS) + len(JUDGE_FILES) + len(OTHER_COMMANDS))
    assert n >= 150, n
