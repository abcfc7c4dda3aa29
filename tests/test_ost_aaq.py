"""OST (learned rotations + scales, KL-top) and AAQ (the same + contrastive loss) on the real toy
pair: toy-chat (FT, aligned) and toy-base (PT, its unaligned parent). Few steps on short windows
so that the default run stays fast; the full recipe runs in bench/ and the slow test."""

import copy
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.models import load_model
from harness.perplexity import PerplexitySettings, load_text, perplexity
from quantizers import QuantContext, QuantizerError, build_quantizer, iter_quant_linears
from quantizers.ost import LEARNED_SITES
from quantizers.transforms import OnlineHadamard


@pytest.fixture(scope="module")
def toy_base():
    return load_model("toy-base", device="cpu")


@pytest.fixture(scope="module")
def batches(toy_chat):
    """Four batches of 2 x 64 tokens of held-out-style text (real tokens, not random ids)."""
    ids = toy_chat.tokenizer(load_text("toy-heldout")[:8000], return_tensors="pt", verbose=False)["input_ids"][0]
    return [ids[i * 128:(i + 1) * 128].reshape(2, 64) for i in range(4)]


def _ctx(toy_chat, batches, base=None):
    return QuantContext(tokenizer=toy_chat.tokenizer, calibration_batches=batches,
                        reference_model=toy_chat.model, base_model=base, seed=0)


def test_ost_training_reduces_kl_top(toy_chat, batches, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("ost", {"steps": 8, "max_batches": 1, "weights": "rtn", "lr_rotation": 0.005})
    q.apply(model, "w4a4kv4", _ctx(toy_chat, batches))
    curve = q.metadata["calibration"]["curves"]["kl_top"]
    assert len(curve) == 8
    assert curve[-1] < 0.9 * curve[0]
    assert q.metadata["transforms"]["orthogonality_error"] < 1e-4
    # the reference model was not touched
    assert not any(True for _ in iter_quant_linears(toy_chat.model))
    assert toy_chat.model.lm_head.weight is toy_chat.model.model.embed_tokens.weight


def test_aaq_end_to_end_on_the_toy_pair(toy_chat, toy_base, batches, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("aaq", {"steps": 4, "weights": "gptq"})
    q.apply(model, "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
    cal = q.metadata["calibration"]
    assert cal["steps_run"] == 4 and cal["stopped_early"] is None
    for term in ("loss", "pull", "push"):
        assert len(cal["curves"][term]) == 4
    for loss, pull, push in zip(cal["curves"]["loss"], cal["curves"]["pull"], cal["curves"]["push"]):
        assert loss == pytest.approx(pull - 0.75 * push, abs=1e-4)
        assert pull >= 0 and push > 0
    assert q.metadata["weights"]["method"] == "gptq"
    linears = dict(iter_quant_linears(model))
    assert len(linears) == 4 * 7 and all(m.a_bits == 4 and m.w_bits == 4 for m in linears.values())
    assert isinstance(linears["model.layers.0.mlp.down_proj"].input_transform, OnlineHadamard)
    assert model.model.layers[0].self_attn.safequant_kv.bits == 4
    with torch.no_grad():
        out = model(batches[0]).logits
    assert torch.isfinite(out).all()
    ppl = perplexity(model, toy_chat.tokenizer, load_text("toy-heldout"), PerplexitySettings(max_tokens=2048),
                     progress=False)["perplexity"]
    assert ppl < 1000


def test_aaq_guard_stops_a_diverging_push(toy_chat, toy_base, batches, one_thread):
    opts = {"steps": 6, "max_batches": 1, "weights": "rtn", "alpha": 5.0, "lr_rotation": 0.3,
            "lr_scale": 0.3, "guard_factor": 1.05}
    q = build_quantizer("aaq", opts)
    q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
    # pushing too hard shows first in the pull term (the model leaves FT) or in push itself
    assert re.search(r"(push|pull) term diverged", q.metadata["stopped_early"])
    assert q.metadata["calibration"]["steps_run"] < 6
    with pytest.raises(QuantizerError, match=r"(push|pull) term diverged"):
        build_quantizer("aaq", {**opts, "guard_action": "error"}).apply(
            copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))


def test_aaq_rejects_a_base_model_with_another_vocabulary(toy_chat, batches):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(QuantizerError, match="vocabulary differs"):
        build_quantizer("aaq").apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, other))
    with pytest.raises(QuantizerError, match="needs the unaligned base model"):
        build_quantizer("aaq").apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches))


def test_ost_rejects_bad_options(toy_chat, batches):
    with pytest.raises(QuantizerError, match="quantizes neither"):
        build_quantizer("ost", {"engine": "parametrize"}).apply(copy.deepcopy(toy_chat.model), "w4a16",
                                                                 _ctx(toy_chat, batches))
    with pytest.raises(QuantizerError, match="needs engine=fused"):
        build_quantizer("ost", {"engine": "parametrize", "ste_weights": "on"})
    with pytest.raises(QuantizerError, match="nothing to learn"):
        build_quantizer("ost", {"learn_r1": "false", "learn_r2": "false", "learn_scales": "false"})
    with pytest.raises(QuantizerError, match="alpha"):
        build_quantizer("aaq", {"alpha": "-1"})
    with pytest.raises(QuantizerError, match="warmup=4 must be >= 0 and below steps=4"):
        build_quantizer("ost", {"steps": "4", "warmup": "4"})


def test_ost_warmup_starts_the_rotations_slower(toy_chat, batches, one_thread):
    """The first step's loss is the same (nothing trained yet); after it a warmed-up run has
    moved less. warmup=0 with the constant schedule is the default path, value for value."""
    curves = {}
    for label, options in [("default", {}), ("none", {"warmup": "0", "schedule": "constant"}),
                           ("warm", {"warmup": "3", "schedule": "cosine"})]:
        q = build_quantizer("ost", {"steps": 4, "max_batches": 1, "weights": "rtn", **options})
        q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches))
        curves[label] = q.metadata["calibration"]["curves"]["kl_top"]
    assert curves["none"] == curves["default"]
    assert curves["warm"][0] == pytest.approx(curves["default"][0], rel=1e-6)
    assert curves["warm"][1] != pytest.approx(curves["default"][1], rel=1e-6)


class _GradCapture:
    """Wraps the shared calibration loop to keep the gradients of its last step (the loop itself runs)."""

    def __init__(self, monkeypatch):
        import quantizers.ost as ost_module

        self.grads: list[torch.Tensor] = []
        real = ost_module.run_calibration

        def run(loss_fn, groups, *args, **kwargs):
            out = real(loss_fn, groups, *args, **kwargs)
            self.grads = [p.grad.clone() for g in groups for p in g["params"]]
            return out

        monkeypatch.setattr(ost_module, "run_calibration", run)


@pytest.mark.parametrize("method", ["ost", "aaq"])
def test_fused_engine_equals_the_parametrize_engine(method, toy_chat, toy_base, batches, one_thread, monkeypatch):
    """At the same transforms the per-layer fused forward gives the old path's loss on every batch
    and its gradients. (Whole training curves cannot be compared to float tolerance: 4-bit rounding
    makes the trajectory chaotic; the old path run on 1 and on 2 threads already drifts apart by
    ~5% at step 3 on this pair.)"""
    capture = _GradCapture(monkeypatch)
    curves, grads, outputs = {}, {}, {}
    for engine in ("parametrize", "fused"):
        frozen = {"steps": 4, "lr_rotation": 0, "lr_scale": 0}  # same transforms on all four batches
        q = build_quantizer(method, {**frozen, "weights": "rtn", "engine": engine, "autocast": "off",
                                     "checkpoint": "true"})
        model = q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
        curves[engine] = q.metadata["calibration"]["curves"]["loss"]
        with torch.no_grad():
            outputs[engine] = model(batches[1]).logits  # the fused, quantized variant
        for seed in (0, 1):  # two random Hadamard starting points
            q = build_quantizer(method, {"steps": 1, "weights": "rtn", "engine": engine, "autocast": "off",
                                         "checkpoint": "true"})
            ctx = _ctx(toy_chat, batches, toy_base.model)
            ctx.seed = seed
            q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", ctx)
            grads[engine, seed] = capture.grads
    assert q.metadata["training"]["engine"] == "fused" and q.metadata["training"]["checkpoint"]
    # the logged curves are rounded to 6 decimals: two equal losses either side of a rounding
    # boundary differ by 1e-6 (measured: 0.033928 against 0.033927)
    assert curves["fused"] == pytest.approx(curves["parametrize"], rel=1e-5, abs=1.01e-6)
    assert torch.allclose(outputs["fused"], outputs["parametrize"], atol=1e-3)
    for seed in (0, 1):
        pairs = list(zip(grads["parametrize", seed], grads["fused", seed]))
        assert len(pairs) == 1 + 4 + 4 * len(LEARNED_SITES)  # R1, one R2 per layer, the scales
        for old, new in pairs:  # measured: ~5e-6 relative
            assert float((old - new).norm()) <= 1e-4 * float(old.norm()) + 1e-12


def test_fused_engine_with_a_quantized_lm_head(toy_chat, batches, one_thread):
    """``noskip``: lm_head reads quantized activations, so its weight is transformed (not its input)."""
    outputs, curves = {}, {}
    for engine in ("parametrize", "fused"):
        q = build_quantizer("ost", {"steps": 2, "lr_rotation": 0, "lr_scale": 0, "weights": "rtn", "engine": engine,
                                    "autocast": "off"})
        model = q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4-noskip", _ctx(toy_chat, batches))
        curves[engine] = q.metadata["calibration"]["curves"]["kl_top"]
        with torch.no_grad():
            outputs[engine] = model(batches[0]).logits
    # the logged curves are rounded to 6 decimals: two equal losses either side of a rounding
    # boundary differ by 1e-6 (measured: 0.033928 against 0.033927)
    assert curves["fused"] == pytest.approx(curves["parametrize"], rel=1e-5, abs=1.01e-6)
    assert torch.allclose(outputs["fused"], outputs["parametrize"], atol=1e-3)


def test_fused_engine_without_checkpointing_is_the_same_computation(toy_chat, batches, one_thread):
    curves = []
    for checkpoint in ("true", "false"):
        q = build_quantizer("ost", {"steps": 3, "weights": "rtn", "checkpoint": checkpoint, "autocast": "off",
                                    "hold_weights": "false"})
        q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches))
        curves.append(q.metadata["calibration"]["curves"]["kl_top"])
    assert curves[0] == pytest.approx(curves[1], rel=1e-6)


@pytest.mark.parametrize(("method", "scheme"), [("ost", "w4a4kv4"), ("aaq", "w4a4kv4"), ("ost", "w4a16g64")])
def test_held_weights_and_micro_batches_give_the_same_gradients(method, scheme, toy_chat, toy_base, batches,
                                                                 one_thread, monkeypatch):
    """Transforming the weights once per step (``hold_weights``) and splitting each step into
    micro-batches (gradient accumulation) change when the gradients are computed, not what they
    are: the first step's loss and every parameter's gradient equal the plain per-forward path's
    (checkpointing off, one micro-batch) to float rounding, weight-only STE schemes included."""
    capture = _GradCapture(monkeypatch)
    configs = {"plain": ("false", "false", 1), "held+ckpt+micro": ("true", "true", 2),
               "held": ("false", "true", 1), "micro": ("false", "false", 2)}
    losses, grads, training = {}, {}, {}
    for name, (checkpoint, hold, micro) in configs.items():
        q = build_quantizer(method, {"steps": 1, "weights": "rtn", "autocast": "off", "checkpoint": checkpoint,
                                     "hold_weights": hold, "micro_batches": micro})
        q.apply(copy.deepcopy(toy_chat.model), scheme, _ctx(toy_chat, batches, toy_base.model))
        losses[name] = q.metadata["calibration"]["curves"]["loss"][0]
        grads[name] = capture.grads
        training[name] = q.metadata["training"]
    assert training["held+ckpt+micro"]["hold_weights"] and training["held+ckpt+micro"]["micro_batches"] == 2
    assert not training["plain"]["hold_weights"] and training["plain"]["micro_batches"] == 1
    for name in configs:
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-5)
        assert len(grads[name]) == len(grads["plain"]) > 0
        total = sum(float(g.norm()) ** 2 for g in grads["plain"]) ** 0.5
        for ref, got in zip(grads["plain"], grads[name]):  # a float-noise gradient is judged against the total
            assert float((ref - got).norm()) <= 1e-4 * float(ref.norm()) + 1e-6 * total, name


def test_targets_are_cached_one_micro_batch_at_a_time_with_the_same_values(toy_chat, toy_base, batches, one_thread):
    """With micro_batches=N the frozen models run N row slices of each batch (1/N of the
    vocabulary-wide logits and softmaxes at a time): the cached targets and the contrast
    diagnostics are the whole batch's."""
    frozen = {"ref": toy_chat.model, "base": toy_base.model}
    whole_t, whole_d = build_quantizer("aaq", {}).cache_targets(frozen, batches, torch.device("cpu"))
    split_t, split_d = build_quantizer("aaq", {"micro_batches": 2}).cache_targets(frozen, batches, torch.device("cpu"))
    for whole, split in zip(whole_t, split_t):
        assert whole.keys() == split.keys() == {"pull", "push"}
        for key in whole:
            assert whole[key].index.shape == split[key].index.shape == (2, 64, 500)
            assert torch.equal(whole[key].index, split[key].index)
            torch.testing.assert_close(whole[key].log_p, split[key].log_p, rtol=1e-5, atol=1e-6)
    for whole, split in zip(whole_d, split_d):
        assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)


def test_micro_batches_must_divide_the_calibration_batch(toy_chat, batches):
    q = build_quantizer("ost", {"steps": 1, "micro_batches": 3, "weights": "rtn"})
    with pytest.raises(QuantizerError, match="micro_batches=3 must divide the calibration batch of 2"):
        q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches))
    with pytest.raises(QuantizerError, match="need engine=fused"):
        build_quantizer("ost", {"engine": "parametrize", "micro_batches": 2})
    with pytest.raises(QuantizerError, match="micro_batches=0"):
        build_quantizer("ost", {"micro_batches": 0})


def test_checkpoint_auto_checkpoints_only_when_memory_needs_it(toy_chat):
    from quantizers.fused_forward import available_memory_bytes, checkpoint_needed
    from quantizers.transforms import model_parts

    parts = model_parts(toy_chat.model)
    needed, estimate = checkpoint_needed(parts, 4096, element_bytes=4, available=None)
    assert needed and estimate > 0  # unknown free memory: checkpoint
    assert checkpoint_needed(parts, 4096, element_bytes=4, available=4 * estimate) == (False, estimate)
    assert checkpoint_needed(parts, 4096, element_bytes=4, available=estimate) == (True, estimate)
    assert checkpoint_needed(parts, 8192, element_bytes=4, available=None)[1] == 2 * estimate
    assert available_memory_bytes("cpu") > 0
    assert build_quantizer("ost", {"checkpoint": "auto"}).options.checkpoint == "auto"
    assert build_quantizer("ost", {"checkpoint": "false"}).options.checkpoint is False
    with pytest.raises(QuantizerError, match="checkpoint"):
        build_quantizer("ost", {"checkpoint": "sometimes"})


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16g64", "w3a16"])
def test_weight_only_schemes_train_against_straight_through_weights(scheme, toy_chat, batches, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("ost", {"steps": 6, "max_batches": 1, "weights": "rtn", "lr_rotation": 0.005,
                                "autocast": "off"})
    q.apply(model, scheme, _ctx(toy_chat, batches))
    assert q.metadata["training"]["ste_weights"] is True
    curve = q.metadata["calibration"]["curves"]["kl_top"]
    # weights are fake-quantized during training: the first loss is the RTN model's, not ~0
    assert curve[0] > 1e-3
    # training lowers the loss: the second half's mean, not the last step (at W4A16 the toy's loss is
    # small and one step can bounce above the first; seen on an AVX-512 CPU, 0.00569 -> 0.00594)
    late = curve[len(curve) // 2:]
    assert sum(late) / len(late) < curve[0]
    linears = dict(iter_quant_linears(model))
    assert len(linears) == 4 * 7 and all(m.a_bits == 16 and m.w_bits < 16 for m in linears.values())
    assert isinstance(linears["model.layers.0.mlp.down_proj"].input_transform, OnlineHadamard)
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


def test_straight_through_training_is_as_good_as_full_precision_training_at_w3(toy_chat, batches, one_thread):
    """Training against straight-through quantized weights does no harm at W3 on the toy pair. (It
    was asserted to beat full-precision training, but the margin is within the trajectory's float
    noise: perplexity 134.56 against 134.85 before the step-cost changes of issue 12 part 2, 135.66
    against 135.40 after them, 135.19 against 135.15 at the recipe's learning rates: 8 steps on
    this pair cannot tell the two apart.)"""
    ppl = {}
    for ste in ("on", "off"):
        model = copy.deepcopy(toy_chat.model)
        q = build_quantizer("ost", {"steps": 8, "max_batches": 2, "weights": "rtn", "ste_weights": ste,
                                    "lr_rotation": 0.005, "autocast": "off"})
        q.apply(model, "w3a16kv4", _ctx(toy_chat, batches))
        ppl[ste] = perplexity(model, toy_chat.tokenizer, load_text("toy-heldout"), PerplexitySettings(max_tokens=2048),
                              progress=False)["perplexity"]
    assert ppl["on"] < 1.01 * ppl["off"]


def test_aaq_logs_the_contrast_and_warns_when_it_is_weak(toy_chat, toy_base, batches, one_thread, caplog):
    q = build_quantizer("aaq", {"steps": 2, "weights": "rtn", "autocast": "off"})
    with caplog.at_level("WARNING", logger="quantizers.aaq"):
        q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
    contrast = q.metadata["contrast"]
    assert 0 < contrast["tv"] < 1 and 0 <= contrast["top1_differs"] <= 1 and 0 < contrast["topk_differs"] < 1
    assert contrast["sdiff_abs_diff"] > 0 and contrast["weak"] is False
    assert contrast["push_pull_mean"] == pytest.approx(
        sum(q.metadata["calibration"]["curves"]["push_pull"]) / 2, rel=1e-4)
    assert len(q.metadata["calibration"]["curves"]["tv"]) == 2
    assert not [r for r in caplog.records if "barely differ" in r.message]
    # A "base" that is the FT model's own copy: no contrast at all, one warning
    q = build_quantizer("aaq", {"steps": 2, "weights": "rtn", "autocast": "off"})
    with caplog.at_level("WARNING", logger="quantizers.aaq"):
        q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, copy.deepcopy(toy_chat.model)))
    assert q.metadata["contrast"]["tv"] == pytest.approx(0, abs=1e-6) and q.metadata["contrast"]["weak"] is True
    assert len([r for r in caplog.records if "barely differ" in r.message]) == 1
