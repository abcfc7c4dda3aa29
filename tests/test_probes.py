"""probes: capture, SLR probes, separability, transfer, 2D maps, the suite, the CLI and the report
section, on synthetic data and a tiny random Llama (fast; the bundled toy models are in
tests/test_probes_models.py)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from probes.capture import Activations, capture, check_layer_spec, parse_layers
from probes.errors import ProbeError
from probes.projection import project_2d
from probes.separability import drift, fisher_ratio, projection_stats, separability
from probes.slr import SLRProbe, fit_slr, load_probes, save_probes, stratified_split
from probes.suite import TABLE_COLUMNS, ProbeSuite, run_probe_suite
from probes.transfer import transfer, transfer_layers

WORDS = "the a how do i make cake write poem help me with please python process garden song".split()
HARM = "bomb hack bank steal kill poison".split()


# ------------------------------------------------------------------------------------------ fixtures


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS + HARM)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_llama(seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run 10-30x faster on one thread on a busy shared CPU (no OpenMP barrier waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_llama()


def word_prompts(n: int = 40, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    prompts, labels = [], []
    for i in range(n):
        w = rng.choices(WORDS, k=rng.randint(3, 9))
        label = i % 2
        if label:
            w[rng.randrange(len(w))] = rng.choice(HARM)
        prompts.append(" ".join(w))
        labels.append(label)
    return prompts, labels


def gaussian(n: int = 200, d: int = 40, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    X = rng.normal(size=(n, d))
    X[y == 1, :3] += shift
    return X, y


# ------------------------------------------------------------------------------------------ SLR


def test_separable_data_gives_accuracy_one_and_high_separability():
    X, y = gaussian(shift=4.0)
    probe, m = fit_slr(X, y)
    assert m["accuracy"] >= 0.97 and m["auroc"] >= 0.99
    assert 0 < m["nonzero"] < X.shape[1]  # L1 keeps a few channels
    sep = separability(X, y)
    assert sep["fisher"] > 0.5 and sep["fisher"] > 20 * sep["fisher_null"]


def test_non_separable_data_gives_chance_accuracy_and_no_separability():
    X, y = gaussian(n=400, shift=0.0, seed=1)
    _, m = fit_slr(X, y)
    assert 0.3 <= m["accuracy"] <= 0.7
    sep = separability(X, y)
    assert sep["fisher"] < 0.03
    assert sep["fisher"] < 3 * sep["fisher_null"]


def test_direction_is_in_original_space_when_standardised():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from probes.slr import _l1_kwargs

    rng = np.random.default_rng(3)
    X, y = gaussian(shift=1.0, seed=3)
    X = X * rng.uniform(0.01, 100.0, size=X.shape[1]) + rng.normal(0, 50, size=X.shape[1])  # wild scales
    probe = SLRProbe().fit(X, y)
    w, b = probe.direction
    np.testing.assert_allclose(probe.decision_function(X), X @ w + b)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(solver="saga", C=1.0, max_iter=500, random_state=0,
                                                              **_l1_kwargs())).fit(X, y)
    np.testing.assert_allclose(probe.decision_function(X), pipe.decision_function(X), rtol=1e-6, atol=1e-6)
    assert (probe.predict(X) == pipe.predict(X)).all()
    np.testing.assert_allclose(probe.predict_proba(X)[:, 1], pipe.predict_proba(X)[:, 1], atol=1e-9)


def test_unstandardised_probe_matches_plain_sklearn():
    from sklearn.linear_model import LogisticRegression

    from probes.slr import _l1_kwargs

    X, y = gaussian(shift=1.5, seed=4)
    probe = SLRProbe(standardize=False).fit(X, y)
    ref = LogisticRegression(solver="saga", C=1.0, max_iter=500, random_state=0, **_l1_kwargs()).fit(X, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_)
    assert probe.score(X, y) == pytest.approx(ref.score(X, y))
    assert probe.get_params()["C"] == 1.0 and probe.get_params()["max_iter"] == 500


def test_split_is_stratified_seeded_and_80_20():
    y = np.array([1] * 30 + [0] * 70)
    tr, te = stratified_split(y, 0.2, seed=5)
    assert len(te) == 20 and len(tr) == 80 and not set(tr) & set(te)
    assert (y[te] == 1).sum() == 6
    tr2, te2 = stratified_split(y, 0.2, seed=5)
    assert (te == te2).all()


def test_save_load_round_trip(tmp_path):
    X, y = gaussian(shift=2.0)
    probe = SLRProbe().fit(X, y)
    path = probe.save(tmp_path / "one", {"note": "x"})
    assert path.suffix == ".safetensors" and (tmp_path / "one.json").is_file()
    loaded = SLRProbe.load(tmp_path / "one.safetensors")
    np.testing.assert_array_equal(loaded.decision_function(X), probe.decision_function(X))
    assert loaded.n_nonzero_ == probe.n_nonzero_ and loaded.get_params() == probe.get_params()
    np.testing.assert_array_equal(loaded.mean_, probe.mean_)
    # several layers in one file; plain safetensors + JSON, no pickle
    probes = {0: probe, 5: SLRProbe(standardize=False).fit(X, y)}
    save_probes(tmp_path / "set", probes, {"variant": "fp"})
    tensors = load_file(str(tmp_path / "set.safetensors"))
    assert {"layer.0.w", "layer.0.b", "layer.0.mean", "layer.0.scale", "layer.5.w", "layer.5.b"} <= set(tensors)
    assert "layer.5.mean" not in tensors
    back, doc = load_probes(tmp_path / "set")
    assert sorted(back) == [0, 5] and doc["metadata"]["variant"] == "fp"
    for k in probes:
        np.testing.assert_array_equal(back[k].decision_function(X), probes[k].decision_function(X))
    with pytest.raises(ProbeError, match="holds 2 probes"):
        SLRProbe.load(tmp_path / "set")
    with pytest.raises(ProbeError, match="not found"):
        load_probes(tmp_path / "missing")


def test_unfitted_and_wrong_width():
    with pytest.raises(ProbeError, match="not fitted"):
        SLRProbe().predict(np.zeros((2, 3)))
    probe = SLRProbe().fit(*gaussian(shift=2.0))
    with pytest.raises(ProbeError, match="features"):
        probe.predict(np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------ separability


def test_fisher_ratio_matches_its_definition():
    X = np.array([[0.0, 0], [2, 0], [10, 0], [12, 0]])
    y = np.array([0, 0, 1, 1])
    # mu0 = (1,0), mu1 = (11,0): between = 100; tr S0 = tr S1 = 1 -> J = 50
    assert fisher_ratio(X, y) == pytest.approx(50.0)
    s = separability(X, y)
    assert s["center_distance"] == pytest.approx(10.0) and s["within_spread"] == pytest.approx(np.sqrt(2))
    # invariant to rotation, translation and uniform scale
    R = np.array([[0.6, -0.8], [0.8, 0.6]])
    assert fisher_ratio(3 * X @ R + 7, y) == pytest.approx(50.0)


def test_projection_stats():
    s = projection_stats([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1])
    assert s["score_mean_harmful"] == 1.5 and s["score_mean_benign"] == -1.5
    assert s["dprime"] == pytest.approx(3.0 / 0.5) and s["fisher_1d"] == pytest.approx(9.0 / 0.5)


# ------------------------------------------------------------------------------------------ transfer


def test_transfer_on_identical_activations_is_zero_drop():
    X, y = gaussian(shift=1.0)
    tr_idx, te_idx = stratified_split(y)
    probe = SLRProbe().fit(X[tr_idx], y[tr_idx])
    t = transfer(probe, X, X.copy(), y, te_idx)
    assert t["accuracy_drop"] == 0.0 and t["auroc_drop"] == 0.0
    assert t["score_shift_harmful"] == 0.0 and t["score_shift_benign"] == 0.0
    d = drift(X, X.copy(), y)
    assert d["relative_drift"] == 0.0 and d["direction_cosine"] == pytest.approx(1.0)
    per = transfer_layers({3: probe}, {3: X}, {3: X}, y, te_idx)
    assert per[3]["accuracy_drop"] == 0.0


def test_transfer_detects_a_moved_boundary():
    X, y = gaussian(shift=3.0)
    tr_idx, te_idx = stratified_split(y)
    probe = SLRProbe().fit(X[tr_idx], y[tr_idx])
    moved = X.copy()
    moved[y == 1, :3] -= 3.0  # harmful prompts now sit where benign ones are
    t = transfer(probe, X, moved, y, te_idx)
    assert t["accuracy_drop"] > 0.3 and t["score_shift_harmful"] < 0
    with pytest.raises(ProbeError, match="shape"):
        transfer(probe, X, X[:, :5], y)


# ------------------------------------------------------------------------------------------ capture


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3] == parse_layers("all", 4)
    assert parse_layers("0,2", 4) == [0, 2]
    assert parse_layers("1-3", 6) == [1, 2, 3] == parse_layers("1:3", 6)
    assert parse_layers("-1", 4) == [3] and parse_layers([0, -1, 0], 4) == [0, 3]
    for bad in ("4", "-5", "x", "3-1", [1.5], "1-9"):
        with pytest.raises(ProbeError):
            parse_layers(bad, 4)
    # syntax only, before the model is loaded: nothing is expanded
    for ok in (None, "all", "0-1000000000000", "-1,3"):
        check_layer_spec(ok)
    for bad in ("x", "3-1", ",", [None]):
        with pytest.raises(ProbeError):
            check_layer_spec(bad)


def test_batched_capture_equals_one_at_a_time(llama, tok):
    prompts, _ = word_prompts(9)
    batched = capture(llama, tok, prompts, position="both", batch_size=4, progress=False)
    assert batched.layers == [0, 1, 2] and batched.hidden_size == 32 and len(batched) == 9
    assert batched.last_layer == "block"
    singles = [capture(llama, tok, [p], position="both", batch_size=1, progress=False) for p in prompts]
    for pos in ("last", "mean"):
        for layer in batched.layers:
            one = np.concatenate([s.get(layer, pos) for s in singles])
            np.testing.assert_allclose(batched.get(layer, pos), one, atol=2e-5, rtol=1e-4)
            assert batched.get(layer, pos).dtype == np.float32


def test_capture_matches_the_model_block_outputs(llama, tok):
    prompt = "how do i make a cake please"
    acts = capture(llama, tok, [prompt, "kill"], position="both", progress=False)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    seen = []
    handle = llama.model.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = llama(**enc, output_hidden_states=True)
    handle.remove()
    np.testing.assert_allclose(acts.get(0, "last")[0], out.hidden_states[1][0, -1].numpy(), atol=1e-5)
    np.testing.assert_allclose(acts.get(1, "mean")[0], out.hidden_states[2][0].mean(0).numpy(), atol=1e-5)
    # the last layer is the raw block output, not the final-normed hidden state
    np.testing.assert_allclose(acts.get(2, "last")[0], seen[0][0, -1].numpy(), atol=1e-5)
    assert not np.allclose(acts.get(2, "last")[0], out.hidden_states[3][0, -1].numpy(), atol=1e-3)


def test_capture_streams_to_disk(llama, tok, tmp_path):
    prompts, _ = word_prompts(7)
    mem = capture(llama, tok, prompts, layers="0,2", position="mean", batch_size=3, progress=False)
    disk = capture(llama, tok, prompts, layers="0,2", position="mean", batch_size=3, progress=False,
                   stream_dir=tmp_path / "acts")
    assert sorted(p.name for p in (tmp_path / "acts").glob("*.npy")) == ["mean_layer000.npy", "mean_layer002.npy"]
    assert isinstance(disk.get(2), np.memmap)
    back = Activations.load(tmp_path / "acts")
    for layer in (0, 2):
        np.testing.assert_array_equal(mem.get(layer), disk.get(layer))
        np.testing.assert_array_equal(mem.get(layer), back.get(layer))
    assert back.layers == [0, 2] and back.positions == ("mean",)


def test_capture_bad_inputs(llama, tok):
    with pytest.raises(ProbeError, match="out of range"):
        capture(llama, tok, ["the cake"], layers="7", progress=False)
    with pytest.raises(ProbeError, match="list of strings"):
        capture(llama, tok, "the cake", progress=False)
    with pytest.raises(ProbeError, match="empty"):
        capture(llama, tok, ["the cake", ""], progress=False)
    with pytest.raises(ProbeError, match="position"):
        capture(llama, tok, ["the cake"], position="first", progress=False)

    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return {"logits": torch.zeros(input_ids.shape[0], 1, 2)}

    with pytest.raises(ProbeError, match="no hidden states"):
        capture(NoHidden(), tok, ["the cake"], progress=False)


def test_fake_quantized_model_captures(llama, tok):
    from quantizers import QuantContext, QuantScheme, build_quantizer

    q = build_quantizer("rtn", {}).apply(copy.deepcopy(llama), QuantScheme.parse("w4a4"), QuantContext())
    prompts, _ = word_prompts(6)
    a = capture(llama, tok, prompts, progress=False)
    b = capture(q, tok, prompts, progress=False)
    assert b.last_layer == "block"
    diff = np.abs(a.get(2) - b.get(2)).max()
    assert 0 < diff < 10 * np.abs(a.get(2)).max()


# ------------------------------------------------------------------------------------------ maps


@pytest.mark.parametrize("method", ["pca", "lda", "tsne"])
def test_project_2d_puts_variants_in_the_reference_basis(method):
    n = 24 if method == "tsne" else 60  # t-SNE is the slow one
    X, y = gaussian(n=n, d=10, shift=3.0)
    p = project_2d(X, method, y=y, others=[X.copy(), X + 0.01])
    assert p.points.shape == (n, 2) and len(p.others) == 2 and p.others[0].shape == (n, 2)
    assert all(p.axis_labels)
    if method != "tsne":
        np.testing.assert_allclose(p.others[0], p.points, atol=1e-9)  # same data -> same coordinates
        assert p.points[y == 1, 0].mean() > p.points[y == 0, 0].mean()  # harmful on +x


def test_project_2d_bad_input():
    X, y = gaussian(n=20, d=5)
    with pytest.raises(ProbeError, match="unknown"):
        project_2d(X, "umap")
    with pytest.raises(ProbeError, match="labels"):
        project_2d(X, "lda")
    with pytest.raises(ProbeError, match="shape"):
        project_2d(X, "pca", others=[X[:, :3]])


# ------------------------------------------------------------------------------------------ suite


def test_suite_end_to_end(llama, tok, tmp_path):
    from quantizers import QuantContext, QuantScheme, build_quantizer

    prompts, labels = word_prompts(40)
    q = build_quantizer("rtn", {}).apply(copy.deepcopy(llama), QuantScheme.parse("w4a4"), QuantContext())
    res = run_probe_suite(llama, {"same": copy.deepcopy(llama), "rtn-w4a4": lambda: q}, tok, prompts, labels,
                          out_dir=tmp_path, progress=False, figure_formats=("svg",), ids=[f"p{i}" for i in range(40)])
    json.dumps(res, allow_nan=False)  # JSON-able, no NaN
    assert res["reference"] == "fp" and [v["name"] for v in res["variants"]] == ["fp", "same", "rtn-w4a4"]
    assert res["layers"] == [0, 1, 2] and res["n"] == {"harmful": 20, "benign": 20, "train": 32, "test": 8}
    fp, same, rtn = res["variants"]
    assert fp["is_reference"] and fp["mean_transfer_drop"] is None
    for r in same["layers"]:
        assert r["transfer_drop"] == 0.0 and r["relative_drift"] == 0.0
        assert r["accuracy"] == fp["layers"][r["layer"]]["accuracy"]
    assert all(r["relative_drift"] > 0 for r in rtn["layers"])
    files = res["files"]
    for rel in (files["table_csv"], files["table_json"], files["scores_csv"], files["summary_json"],
                files["figures"]["metrics"]["svg"], files["figures"]["maps"]["svg"], files["figures"]["scores"]["svg"],
                *files["probes"].values()):
        assert (tmp_path / rel).is_file(), rel
    assert files["table_csv"] == "probes/layers.csv"
    header = (tmp_path / "probes/layers.csv").read_text().splitlines()[0].split(",")
    assert header == list(TABLE_COLUMNS)
    table = json.loads((tmp_path / "probes/layers.json").read_text())
    assert len(table) == 9
    probes, doc = load_probes(tmp_path / files["probes"]["fp"])
    assert sorted(probes) == [0, 1, 2] and doc["metadata"]["last_layer"] == "block"
    scores = (tmp_path / "probes/scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 3 * 3 * 40 and scores[1].startswith("fp,0,0,p0,")


def test_suite_bad_inputs(llama, tok, tmp_path):
    prompts, labels = word_prompts(40)
    with pytest.raises(ProbeError, match="at least 5 of each"):
        ProbeSuite(tok, prompts[:8], labels[:8], tmp_path)
    with pytest.raises(ProbeError, match="at least 5 of each"):
        ProbeSuite(tok, prompts[:21], [1] + [0] * 20, tmp_path)  # a single-member class
    with pytest.raises(ProbeError, match="labels"):
        ProbeSuite(tok, prompts, labels[:-1], tmp_path)
    with pytest.raises(ProbeError, match="unknown probe option"):
        ProbeSuite(tok, prompts, labels, tmp_path, colour="red")
    suite = ProbeSuite(tok, prompts, labels, tmp_path, layers="9", progress=False)
    with pytest.raises(ProbeError, match="out of range"):
        suite.add("fp", llama)
    suite = ProbeSuite(tok, prompts, labels, tmp_path, progress=False, figures=False)
    suite.add("fp", llama)
    with pytest.raises(ProbeError, match="already probed"):
        suite.add("fp", llama)
    with pytest.raises(ProbeError, match="same model"):
        suite.add("other", make_llama(layers=2))


def test_suite_mean_position_lda_and_streaming(llama, tok, tmp_path):
    prompts, labels = word_prompts(30)
    res = run_probe_suite(llama, {"copy": lambda: copy.deepcopy(llama)}, tok, prompts, labels, layers="1-2",
                          out_dir=tmp_path, subdir="", progress=False, position="mean", map_method="lda", stream=True,
                          figure_formats=("png",), max_map_layers=1)
    assert res["position"] == "mean" and res["layers"] == [1, 2] and len(res["map_layers"]) == 1
    assert all(r["transfer_drop"] == 0.0 for r in res["variants"][1]["layers"])
    assert res["files"]["table_csv"] == "layers.csv" and (tmp_path / "maps.png").is_file()
    assert not (tmp_path / "activations").exists()  # streamed files removed at the end


# ------------------------------------------------------------------------------------------ CLI + report


def test_cli_bad_input_exits_2(capsys, tmp_path):
    from harness.cli import main

    assert main(["probe", "--limit", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 5 of each" in err
    assert main(["probe", "--variant", "nosuch:w4a4", "--out", str(tmp_path)]) == 2
    assert main(["probe", "--benign", str(tmp_path / "none.csv"), "--out", str(tmp_path)]) == 2
    assert main(["probe", "--benign", "harmful", "--out", str(tmp_path)]) == 2
    assert "no prompts labelled benign" in capsys.readouterr().err


def test_report_probe_section(llama, tok, tmp_path):
    from reports import render

    prompts, labels = word_prompts(30)
    res = run_probe_suite(llama, {"copy": copy.deepcopy(llama)}, tok, prompts, labels, out_dir=tmp_path,
                          progress=False, figure_formats=("svg",), reference="fp<script>")
    summary = {"schema_version": 1, "variants": [{"name": "fp", "method": "fp", "scheme": "fp",
                                                   "metrics": {"refusal": {"harmful": 0.9}, "perplexity": 10.0}}],
               "prompt_sets": {"harmful": {"role": "harmful", "n": 10}}, "probes": res}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    html = Path(render(tmp_path)).read_text()
    assert 'id="probes"' in html and "Activation probes" in html
    assert html.count("data:image/svg+xml;base64,") >= 3
    assert "fp<script>" not in html and "fp&lt;script&gt;" in html  # the report has its own script; ours is escaped
    # without summary["probes"] the section falls back to probes/probe_summary.json, and without that it is gone
    del summary["probes"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert 'id="probes"' in Path(render(tmp_path)).read_text()
    (tmp_path / "probes" / "probe_summary.json").unlink()
    assert 'id="probes"' not in Path(render(tmp_path)).read_text()
