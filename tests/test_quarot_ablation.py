"""bench/bench_quarot_ablation.py: its step-by-step QuaRot rebuild must be QuaRot (else the
ablation measures something else), every prefix must be exact in full precision, and bad input is
one line, exit 2."""

import copy
import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO

from quantizers.base import QuantContext, build_quantizer
from quantizers.modules import iter_quant_linears
from quantizers.scheme import QuantScheme


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quarot_ablation", REPO / "bench" / "bench_quarot_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("steps", ["fold", "fold+r1", "fold+r1+r2", "fold+r1+r2+down", "r2+down"])
def test_every_prefix_is_exact_in_full_precision(toy_chat, one_thread, bench, steps):
    ids = toy_chat.tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]
    ref = _logits(toy_chat.model, ids)
    model = copy.deepcopy(toy_chat.model)
    scheme = QuantScheme.parse("w4a16")
    online = bench.transform(model, bench.parse_transform(steps), scheme)
    bench.weigh(model, online, "fp", scheme)
    out = _logits(model, ids)
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4), (out - ref).abs().max()
    if "r1" in steps:  # the rotation really happened (not a no-op that trivially passes)
        assert not torch.allclose(model.model.embed_tokens.weight, toy_chat.model.model.embed_tokens.weight)


def test_rotation_without_folding_is_caught(toy_chat, one_thread, bench):
    """R1 needs folded norms: without them the logits differ, so the exactness check above can fail."""
    ids = toy_chat.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    model = copy.deepcopy(toy_chat.model)
    scheme = QuantScheme.parse("w4a16")
    bench.weigh(model, bench.transform(model, {"r1"}, scheme), "fp", scheme)
    assert not torch.allclose(_logits(model, ids), _logits(toy_chat.model, ids), atol=1e-3, rtol=1e-4)


def test_full_rebuild_has_quarot_weights(toy_chat, one_thread, bench):
    scheme = QuantScheme.parse("w4a16")
    model = copy.deepcopy(toy_chat.model)
    online = bench.transform(model, bench.parse_transform("fold+r1+r2+down"), scheme)
    bench.weigh(model, online, "rtn-mse", scheme)
    quarot = build_quantizer("quarot", {"weights": "rtn"}).apply(copy.deepcopy(toy_chat.model), scheme,
                                                                  QuantContext(seed=0))
    mine = dict(iter_quant_linears(model))
    theirs = dict(iter_quant_linears(quarot))
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert torch.equal(mine[name].weight, theirs[name].weight), name
        assert (mine[name].input_transform is None) == (theirs[name].input_transform is None), name


def test_skipped_down_proj_gets_no_online_hadamard(toy_chat, one_thread, bench):
    """--only without down_proj: a skipped down_proj stays a plain Linear, so it must not get the
    online Hadamard's inverse fused into its weight (the first version of this script did, and
    scored QuaRot at 1e10 perplexity). At 8 bits the rebuild stays about as close to FP as RTN."""
    scheme = QuantScheme.parse("w8a16-skip=lm_head+down_proj")
    ids = toy_chat.tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]
    ref = _logits(toy_chat.model, ids)
    gaps = {}
    for steps in ("none", "fold+r1+r2+down"):
        model = copy.deepcopy(toy_chat.model)
        bench.weigh(model, bench.transform(model, bench.parse_transform(steps), scheme), "rtn", scheme)
        gaps[steps] = (_logits(model, ids) - ref).abs().max().item()
    assert gaps["fold+r1+r2+down"] < 3 * gaps["none"] + 1e-3, gaps


def test_layer_errors_see_the_clip(toy_chat, one_thread, bench):
    """The per-layer output error is an error (>0, <1 at 4 bits) and is exactly 0 at 8 bits for no
    layer, so the statistic can tell the grids apart."""
    scheme = QuantScheme.parse("w4a16")
    model = copy.deepcopy(toy_chat.model)
    bench.weigh(model, bench.transform(model, set(), scheme), "fp", scheme)
    ids = toy_chat.tokenizer("Some calibration text for the toy model. " * 4, return_tensors="pt")["input_ids"]
    errors = bench.layer_errors(model, bench.input_hessians(model, [ids]), scheme, bench.reader_norms(toy_chat.model))
    assert errors and all(0 < r["out_max"] < 1 and 0 < r["out_mse"] < 1 for r in errors.values())
    writers = {n for n, r in errors.items() if "outg_max" in r}
    assert writers and all(n.endswith(("o_proj", "down_proj")) for n in writers)
    assert all(0 < errors[n]["outg_max"] < 1 for n in writers)
    types = bench.summarise(errors)
    assert set(types) <= {*bench.PROJ, "v_to_o"} and {"down_proj", "v_to_o"} <= set(types)


@pytest.mark.parametrize("args, needle", [(["--transforms", "fold+r9"], "r9"),
                                          (["--only", "mlp"], "mlp")])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    done = subprocess.run([sys.executable, "bench/bench_quarot_ablation.py", *args, "--out", str(tmp_path / "a.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and needle in done.stderr
    assert not (tmp_path / "a.json").exists()


def test_norm_amplification_is_one_for_a_flat_norm_weight(toy_chat, one_thread, bench):
    """A = rms(g) sqrt(sum m / sum m g^2) is 1 for a constant g whatever the activations, and
    above 1 once g shrinks the channel with the most input energy."""
    ids = toy_chat.tokenizer("Some calibration text for the toy model. " * 4, return_tensors="pt")["input_ids"]
    model = copy.deepcopy(toy_chat.model)
    parts = bench.model_parts(model)
    with torch.no_grad():
        for lp in parts.layers:
            lp.input_norm.weight.fill_(0.7)
            lp.post_norm.weight.fill_(0.7)
    flat = bench.norm_amplification(model, [ids])
    assert len(flat) == 2 * len(parts.layers)
    assert all(abs(r["amplification"] - 1) < 1e-6 for r in flat.values())
    name = f"{parts.layers[0].prefix}.post_attention_layernorm"
    with torch.no_grad():
        parts.layers[0].post_norm.weight[flat[name]["top_channel"]] = 1e-3
    assert bench.norm_amplification(model, [ids])[name]["amplification"] > 1.01
