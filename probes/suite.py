"""The probe suite: capture, fit, compare and draw, for a reference model and its variants.

Use it incrementally (the audit's loop builds one variant at a time, so only one quantized copy is
in memory at once)::

    suite = ProbeSuite(tokenizer, formatted_prompts, labels, run_dir, ids=ids)
    suite.add("fp", fp_model)            # the first model added is the reference
    suite.add("rtn-w4a4", quantized)     # FP probe transferred + the variant's own probe
    summary["probes"] = suite.finish()   # writes RUN_DIR/probes/*, returns a JSON-able dict

or in one call with :func:`run_probe_suite`. Files written under ``out_dir / subdir``:

``layers.csv`` / ``layers.json``   one row per (variant, layer): the table described in
                                   docs/architecture.md ("Probe results")
``scores.csv``                     per prompt, variant and layer: the reference probe's score
                                   ``w . h + b`` and the prompt's label and split
``probes_<variant>.safetensors``   per-layer SLR probes (+ ``.json``), ``w``/``b`` in the raw
                                   activation space (load with ``probes.slr.load_probes``)
``metrics.svg|png``, ``maps.svg|png``, ``scores.svg|png``   figures (probes.figures)
``probe_summary.json``             the dict :meth:`ProbeSuite.finish` returns
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .capture import Activations, capture, count_layers, parse_layers
from .errors import ProbeError
from .separability import drift, projection_stats, separability
from common.files import atomic_write

from .slr import SLRProbe, as_binary_labels, fit_slr, save_probes, stratified_split
from .transfer import transfer

log = logging.getLogger(__name__)

__all__ = ["ProbeSettings", "ProbeSuite", "run_probe_suite", "SCHEMA_VERSION", "TABLE_COLUMNS"]

SCHEMA_VERSION = 1
SUMMARY_FILE = "probe_summary.json"

#: Columns of layers.csv / rows of layers.json, in order.
TABLE_COLUMNS = (
    "variant", "layer", "position", "accuracy", "auroc", "train_accuracy", "nonzero", "n_features",
    "converged", "fisher", "fisher_null", "dprime", "fisher_1d", "score_mean_harmful", "score_mean_benign",
    "score_std_harmful", "score_std_benign",
    "transfer_accuracy", "transfer_auroc", "transfer_drop", "score_shift_harmful", "score_shift_benign",
    "relative_drift", "direction_cosine", "fit_seconds",
)


@dataclass
class ProbeSettings:
    """Everything that decides the probe results besides the model and the prompts."""

    layers: Any = None  # None/"all", "0,2,5", "4-10", [0, -1]: decoder-block indices
    position: str = "last"  # last | mean
    C: float = 1.0
    max_iter: int = 500
    standardize: bool = True
    test_size: float = 0.2
    seed: int = 0
    batch_size: int = 16
    max_tokens: int | None = None
    map_method: str = "pca"  # pca | lda | tsne
    map_layers: Any = None  # None: up to max_map_layers, evenly spaced plus the reference's best layer
    max_map_layers: int = 4
    map_standardize: bool = False
    figure_formats: tuple[str, ...] = ("svg", "png")
    figures: bool = True
    stream: bool = False  # stream activations to <out>/activations/<variant>/*.npy
    keep_activations: bool = False  # keep the streamed .npy files after finish()
    save_variant_probes: bool = True  # also save each variant's own probes (the reference's always)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.position not in ("last", "mean"):
            raise ProbeError(f"position {self.position!r} is unknown; use last or mean")
        if self.map_method not in ("pca", "lda", "tsne"):
            raise ProbeError(f"unknown 2D map method {self.map_method!r}; use pca, lda or tsne")
        bad = [f for f in self.figure_formats if f not in ("svg", "png", "pdf")]
        if bad:
            raise ProbeError(f"figure format {bad[0]!r} is not supported; use svg, png or pdf")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ProbeError(f"C must be a positive number, got {self.C!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ProbeError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not isinstance(self.max_map_layers, int) or self.max_map_layers < 1:
            raise ProbeError(f"max_map_layers must be a positive integer, got {self.max_map_layers!r}")
        self.figure_formats = tuple(self.figure_formats)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("progress", "figures", "figure_formats", "stream", "keep_activations", "save_variant_probes"):
            d.pop(k)
        d.update(solver="saga", penalty="l1", split="stratified")
        return d


@dataclass
class _Entry:
    name: str
    is_reference: bool
    capture_seconds: float
    fit_seconds: float
    rows: list[dict[str, Any]]
    map_acts: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # reference probe scores, all prompts
    probe_file: str | None = None
    last_layer: str = "block"


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "variant"
    return s[:80]


def _clean(v: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, recursively."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()


class ProbeSuite:
    """Probe a reference model and its variants on one set of prompts; see the module docstring.

    ``prompts`` are already chat-formatted strings; ``labels`` 1/harmful or 0/benign per prompt;
    ``ids`` optional per-prompt ids (kept in scores.csv). ``out_dir`` is the run directory: files go
    to ``out_dir / subdir`` and every path in the returned dict is relative to ``out_dir``.
    Settings are :class:`ProbeSettings` fields, given as keyword arguments or ``settings=``.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], labels: Any, out_dir: str | Path, *,
                 ids: Sequence[str] | None = None, subdir: str = "probes", settings: ProbeSettings | None = None,
                 **options: Any):
        names = {f.name for f in fields(ProbeSettings)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ProbeError(f"unknown probe option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if settings is not None and options:
            raise ProbeError("pass probe options either as settings= or as keywords, not both")
        self.settings = settings or ProbeSettings(**options)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ProbeError("prompts must be a non-empty list of chat-formatted strings")
        self.prompts = list(prompts)
        self.labels = as_binary_labels(labels, len(self.prompts))
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(self.prompts))]
        if len(self.ids) != len(self.prompts):
            raise ProbeError(f"got {len(self.ids)} ids for {len(self.prompts)} prompts; pass one id per prompt")
        self.train, self.test = stratified_split(self.labels, self.settings.test_size, self.settings.seed)
        self.tokenizer = tokenizer
        self.root = Path(out_dir)
        self.subdir = subdir.strip("/") if subdir else ""
        self.dir = self.root / self.subdir if self.subdir else self.root
        self.entries: list[_Entry] = []
        self.layers: list[int] | None = None
        self.n_layers: int | None = None
        self.hidden_size: int | None = None
        self.map_layers: list[int] | None = None
        self.ref_acts: dict[int, np.ndarray] = {}
        self.ref_probes: dict[int, SLRProbe] = {}
        self._stream_dirs: list[Path] = []
        self.files: dict[str, Any] = {"probes": {}, "figures": {}}

    # ------------------------------------------------------------------ helpers
    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @property
    def reference(self) -> str | None:
        return self.entries[0].name if self.entries else None

    def _capture(self, name: str, model) -> Activations:
        s = self.settings
        if self.layers is None:
            n = count_layers(model)
            if n is not None:
                self.layers = parse_layers(s.layers, n)
        elif self.n_layers is not None:
            n = count_layers(model)
            if n is not None and n != self.n_layers:
                raise ProbeError(f"variant {name!r} has {n} decoder layers but the reference has {self.n_layers}; "
                                 "probe variants of the same model only")
        stream_dir = None
        if s.stream:
            stream_dir = self.dir / "activations" / _safe_name(name)
            self._stream_dirs.append(stream_dir)
        acts = capture(model, self.tokenizer, self.prompts, self.layers if self.layers is not None else s.layers,
                       s.position, batch_size=s.batch_size, max_tokens=s.max_tokens, stream_dir=stream_dir,
                       progress=s.progress, desc=f"capture {name}")
        if self.n_layers is None:
            self.n_layers, self.hidden_size, self.layers = acts.n_layers, acts.hidden_size, list(acts.layers)
        elif (acts.n_layers, acts.hidden_size) != (self.n_layers, self.hidden_size):
            raise ProbeError(
                f"variant {name!r} has {acts.n_layers} layers of width {acts.hidden_size} but the reference "
                f"has {self.n_layers} of width {self.hidden_size}; probe variants of the same model only"
            )
        return acts

    def _choose_map_layers(self, rows: list[dict[str, Any]]) -> list[int]:
        s = self.settings
        assert self.layers is not None and self.n_layers is not None
        if s.map_layers is not None:
            chosen = parse_layers(s.map_layers, self.n_layers)
            missing = [x for x in chosen if x not in self.layers]
            if missing:
                raise ProbeError(f"map layer(s) {missing} are not among the probed layers {self.layers}; "
                                 "add them to --layers")
            return chosen
        best = max(rows, key=lambda r: (r["accuracy"], r["auroc"] or 0.0, r["fisher"]))["layer"]
        k, layers = s.max_map_layers, self.layers
        if len(layers) <= k:
            return list(layers)
        if k == 1:
            return [best]
        spaced = [layers[round(i * (len(layers) - 1) / (k - 1))] for i in range(k)]  # first ... last
        if best not in spaced:  # swap the nearest evenly spaced layer for the best one
            j = min(range(k), key=lambda i: abs(spaced[i] - best))
            spaced[j] = best
        return sorted(set(spaced))

    # ------------------------------------------------------------------ the work
    def add(self, name: str, model) -> dict[str, Any]:
        """Capture and probe one model; the first one added is the reference. Returns its record."""
        if not isinstance(name, str) or not name:
            raise ProbeError("every probed model needs a non-empty name")
        if any(e.name == name for e in self.entries):
            raise ProbeError(f"a model named {name!r} was already probed; give each variant a distinct name")
        s = self.settings
        is_ref = not self.entries
        log.info("probes: %s (%s)", name, "reference" if is_ref else "variant")
        acts = self._capture(name, model)
        X_all = acts.by_layer(s.position)
        y = self.labels
        rows: list[dict[str, Any]] = []
        probes: dict[int, SLRProbe] = {}
        t0 = time.perf_counter()
        for layer in acts.layers:
            X = X_all[layer]
            probe, m = fit_slr(X, y, split=(self.train, self.test), seed=s.seed, C=s.C, max_iter=s.max_iter,
                               standardize=s.standardize)
            probes[layer] = probe
            sep = separability(X, y)
            proj = projection_stats(probe.decision_function(X[self.test]), y[self.test])
            row = {"variant": name, "layer": layer, "position": s.position, **{k: m[k] for k in (
                "accuracy", "auroc", "train_accuracy", "nonzero", "n_features", "converged", "fit_seconds")},
                "fisher": sep["fisher"], "fisher_null": sep["fisher_null"], **proj}
            if is_ref:
                row.update(transfer_accuracy=m["accuracy"], transfer_auroc=m["auroc"], transfer_drop=0.0,
                           score_shift_harmful=0.0, score_shift_benign=0.0, relative_drift=0.0, direction_cosine=1.0)
            else:
                tr = transfer(self.ref_probes[layer], self.ref_acts[layer], X, y, self.test)
                dr = drift(self.ref_acts[layer], X, y)
                row.update(transfer_accuracy=tr["accuracy_transfer"], transfer_auroc=tr["auroc_transfer"],
                           transfer_drop=tr["accuracy_drop"], score_shift_harmful=tr["score_shift_harmful"],
                           score_shift_benign=tr["score_shift_benign"], **dr)
            rows.append(row)
        fit_seconds = time.perf_counter() - t0
        if is_ref:
            self.ref_acts = X_all
            self.ref_probes = probes
            self.map_layers = self._choose_map_layers(rows)
        entry = _Entry(name, is_ref, acts.seconds, fit_seconds, rows, last_layer=acts.last_layer)
        entry.scores = {layer: self.ref_probes[layer].decision_function(X_all[layer]) for layer in acts.layers}
        assert self.map_layers is not None
        entry.map_acts = {layer: np.array(X_all[layer], dtype=np.float32) for layer in self.map_layers}
        if is_ref or s.save_variant_probes:
            path = save_probes(self.dir / f"probes_{_safe_name(name)}", probes, {
                "variant": name, "reference": self.reference or name, "position": s.position,
                "layers": list(acts.layers), "n_layers": acts.n_layers, "hidden_size": acts.hidden_size,
                "last_layer": acts.last_layer, "settings": s.key(),
                "metrics": {str(r["layer"]): {k: r[k] for k in ("accuracy", "auroc", "nonzero")} for r in rows}})
            entry.probe_file = self._rel(path)
            self.files["probes"][name] = entry.probe_file
        self.entries.append(entry)
        if not is_ref:
            del X_all, acts  # only the map layers and the scores are kept for the variants
            if s.stream and not s.keep_activations:
                shutil.rmtree(self.dir / "activations" / _safe_name(name), ignore_errors=True)
        record = self._record(entry)
        log.info("probes: %s: best layer %s (accuracy %.3f), capture %.1f s, fit %.1f s", name,
                 record["best_layer"], record["best_accuracy"], entry.capture_seconds, fit_seconds)
        return record

    def _record(self, e: _Entry) -> dict[str, Any]:
        rows = e.rows
        best = max(rows, key=lambda r: (r["accuracy"], r["auroc"] or 0.0, r["fisher"]))
        sep = max(rows, key=lambda r: r["fisher"])
        rec = {"name": e.name, "is_reference": e.is_reference, "capture_seconds": round(e.capture_seconds, 3),
               "fit_seconds": round(e.fit_seconds, 3), "best_layer": best["layer"], "best_accuracy": best["accuracy"],
               "best_auroc": best["auroc"], "max_fisher": sep["fisher"], "max_fisher_layer": sep["layer"],
               "probe_file": e.probe_file, "last_layer": e.last_layer,
               "mean_transfer_drop": None, "max_transfer_drop": None, "worst_transfer_layer": None,
               "layers": [{k: r.get(k) for k in TABLE_COLUMNS if k not in ("variant", "position")} for r in rows]}
        if not e.is_reference:
            worst = max(rows, key=lambda r: r["transfer_drop"])
            rec.update(mean_transfer_drop=float(np.mean([r["transfer_drop"] for r in rows])),
                       max_transfer_drop=worst["transfer_drop"], worst_transfer_layer=worst["layer"])
        return rec

    # ------------------------------------------------------------------ outputs
    def summary(self) -> dict[str, Any]:
        """The JSON-able result so far (no files written)."""
        s = self.settings
        return _clean({
            "schema_version": SCHEMA_VERSION,
            "dir": self.subdir,
            "reference": self.reference,
            "position": s.position,
            "layers": self.layers,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "map_layers": self.map_layers,
            "map_method": s.map_method,
            "n": {"harmful": int((self.labels == 1).sum()), "benign": int((self.labels == 0).sum()),
                  "train": int(len(self.train)), "test": int(len(self.test))},
            "settings": s.key(),
            "variants": [self._record(e) for e in self.entries],
            "files": self.files,
        })

    def table(self) -> list[dict[str, Any]]:
        """All (variant, layer) rows, JSON-safe."""
        return _clean([{k: r.get(k) for k in TABLE_COLUMNS} for e in self.entries for r in e.rows])

    def finish(self) -> dict[str, Any]:
        """Write the table, per-prompt scores, figures and probe_summary.json; return the summary.

        Safe to call after every :meth:`add` (files are rewritten atomically)."""
        if not self.entries:
            raise ProbeError("no model was probed; call add(name, model) first")
        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        table = self.table()
        atomic_write(self.dir / "layers.csv", _csv_text(table, TABLE_COLUMNS))
        atomic_write(self.dir / "layers.json", json.dumps(table, indent=1))
        split = np.full(len(self.labels), "train", dtype=object)
        split[self.test] = "test"
        score_rows = [{"variant": e.name, "layer": layer, "index": i, "id": self.ids[i],
                       "label": "harmful" if self.labels[i] else "benign", "split": split[i], "score": float(sc[i])}
                      for e in self.entries for layer, sc in sorted(e.scores.items()) for i in range(len(sc))]
        atomic_write(self.dir / "scores.csv", _csv_text(score_rows, ("variant", "layer", "index", "id", "label",
                                                                       "split", "score")))
        self.files.update(table_csv=self._rel(self.dir / "layers.csv"), table_json=self._rel(self.dir / "layers.json"),
                          scores_csv=self._rel(self.dir / "scores.csv"))
        if s.figures:
            self._figures()
        if s.stream and not s.keep_activations:
            # The reference's arrays stay readable through their open memory maps (POSIX), so more
            # variants may still be added after finish().
            for d in self._stream_dirs:
                shutil.rmtree(d, ignore_errors=True)
            act_root = self.dir / "activations"
            if act_root.is_dir() and not any(act_root.iterdir()):
                act_root.rmdir()
        result = self.summary()
        atomic_write(self.dir / SUMMARY_FILE, json.dumps(result, indent=1))
        result["files"]["summary_json"] = self._rel(self.dir / SUMMARY_FILE)
        return result

    def _figures(self) -> None:
        from . import figures
        from .projection import project_2d

        s = self.settings
        ref = self.entries[0]
        variants = [e for e in self.entries[1:]]
        title_bits = f"{s.position} token" if s.position == "last" else "mean over prompt tokens"
        out: dict[str, dict[str, str]] = {}
        fig = figures.metrics_figure(self.table(), ref.name, title=f"SLR probes per layer ({title_bits})")
        out["metrics"] = {k: self._rel(v) for k, v in figures.save_figure(fig, self.dir / "metrics", s.figure_formats).items()}
        maps = {}
        for layer in self.map_layers or []:
            maps[layer] = project_2d(ref.map_acts[layer], s.map_method, y=self.labels,
                                     others=[e.map_acts[layer] for e in variants], standardize=s.map_standardize,
                                     seed=s.seed)
        if maps:
            fig = figures.maps_figure(maps, self.labels, reference=ref.name, variants=[e.name for e in variants],
                                      title=f"{s.map_method.upper()} of {title_bits} activations, basis fitted on {ref.name}")
            out["maps"] = {k: self._rel(v) for k, v in figures.save_figure(fig, self.dir / "maps", s.figure_formats).items()}
            scores = {e.name: {layer: e.scores[layer] for layer in self.map_layers} for e in self.entries}
            fig = figures.scores_figure(scores, self.labels, reference=ref.name)
            out["scores"] = {k: self._rel(v) for k, v in figures.save_figure(fig, self.dir / "scores", s.figure_formats).items()}
        self.files["figures"] = out


def run_probe_suite(
    fp_model,
    variants: Mapping[str, Any],
    tokenizer,
    prompts: Sequence[str],
    labels: Any,
    layers: Any = None,
    out_dir: str | Path = ".",
    *,
    reference: str = "fp",
    ids: Sequence[str] | None = None,
    subdir: str = "probes",
    **options: Any,
) -> dict[str, Any]:
    """Probe ``fp_model`` and every variant; write ``out_dir/subdir/*``; return the summary dict.

    ``variants`` maps a name to a model, or to a zero-argument callable that builds it (so only one
    quantized copy need be in memory at a time). Options: :class:`ProbeSettings` fields.
    """
    if layers is not None:
        options["layers"] = layers
    if "settings" in options and options["settings"] is not None and layers is not None:
        raise ProbeError("pass layers inside settings= when settings= is given")
    suite = ProbeSuite(tokenizer, prompts, labels, out_dir, ids=ids, subdir=subdir, **options)
    suite.add(reference, fp_model)
    for name, model in variants.items():
        if not hasattr(model, "parameters") and isinstance(model, Callable):
            model = model()
        suite.add(name, model)
        del model
    return suite.finish()
