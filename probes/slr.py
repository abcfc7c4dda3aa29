"""Sparse logistic-regression (SLR) probes: one L1 logistic regression per layer.

Defaults follow the Q-realign probe (docs: /work/shared/methods/QREALIGN.md): scikit-learn
``LogisticRegression`` with an L1 penalty, ``solver='saga'``, ``C=1.0``, ``max_iter=500``, labels
1 = harmful (malicious), 0 = benign, a stratified 80/20 split with a fixed seed. (scikit-learn
>= 1.8 spells the L1 penalty ``l1_ratio=1.0``; older versions ``penalty='l1'``: the same model.)

One addition: ``standardize=True`` (the default) fits on z-scored features. saga converges badly on
raw hidden states, whose channels differ in scale by orders of magnitude in real models (massive
activations); the penalty then also treats every channel alike. The fitted direction is always
mapped back to the **original activation space**: ``decision_function(h) = h @ w + b`` with the
stored ``w``, ``b``, so a consumer such as Q-realign can use ``w . h + b`` on raw hidden states
without knowing about the scaler. ``standardize=False`` gives the paper's raw-feature fit.

:class:`SLRProbe` is a scikit-learn style estimator (``fit``, ``predict``, ``predict_proba``,
``decision_function``, ``score``, ``get_params``) saved as safetensors (arrays) + JSON (settings,
metrics); never pickled.
"""

from __future__ import annotations

import inspect
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from common.files import atomic_write

from .errors import ProbeError

__all__ = ["SLRProbe", "MIN_PER_CLASS", "as_binary_labels", "stratified_split", "evaluate", "fit_slr",
           "save_probes", "load_probes"]

#: A stratified split with a 20% test share needs this many prompts per class to put at least one
#: of each class in the test set.
MIN_PER_CLASS = 5
FORMAT = "safequant-slr-probe"
FORMAT_VERSION = 1

_LABEL_WORDS = {"harmful": 1, "unsafe": 1, "malicious": 1, "benign": 0, "safe": 0}


def as_binary_labels(y: Any, n: int | None = None) -> np.ndarray:
    """Labels as int64 0/1: accepts 0/1, booleans, or the words harmful/benign (unsafe/safe)."""
    arr = list(y) if not isinstance(y, np.ndarray) else y.tolist()
    out = []
    for v in arr:
        if isinstance(v, str):
            key = v.strip().lower()
            if key not in _LABEL_WORDS:
                raise ProbeError(f"label {v!r} is not harmful/benign (or 1/0); fix the labels")
            out.append(_LABEL_WORDS[key])
        elif isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer, float, np.floating)) and v in (0, 1)):
            out.append(int(v))
        else:
            raise ProbeError(f"label {v!r} is not 0/1 or harmful/benign; fix the labels")
    labels = np.asarray(out, dtype=np.int64)
    if n is not None and len(labels) != n:
        raise ProbeError(f"got {len(labels)} labels for {n} activations; pass one label per prompt")
    return labels


def check_classes(y: np.ndarray, min_per_class: int = MIN_PER_CLASS, what: str = "the probe data") -> None:
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if min(n0, n1) < min_per_class:
        raise ProbeError(
            f"{what} has {n1} harmful and {n0} benign prompts; a stratified 80/20 split needs at least "
            f"{min_per_class} of each: add prompts to the smaller class"
        )


def stratified_split(y: Any, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split -> (train indices, test indices), both sorted."""
    from sklearn.model_selection import train_test_split

    y = as_binary_labels(y)
    if not 0.0 < test_size < 1.0:
        raise ProbeError(f"test_size must be between 0 and 1, got {test_size}")
    check_classes(y)
    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    except ValueError as exc:
        raise ProbeError(f"cannot split {len(y)} prompts with test_size={test_size}: {exc}") from None
    return np.sort(train), np.sort(test)


def _l1_kwargs() -> dict[str, Any]:
    """scikit-learn >= 1.8 deprecates ``penalty=``; ``l1_ratio=1`` is the same L1 model."""
    from sklearn.linear_model import LogisticRegression

    default = inspect.signature(LogisticRegression).parameters["penalty"].default
    return {"l1_ratio": 1.0} if default == "deprecated" else {"penalty": "l1"}


def _check_X(X: Any, what: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ProbeError(f"{what} must be a 2-D array [n_prompts, hidden], got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise ProbeError(f"{what} must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    if not np.isfinite(X).all():
        raise ProbeError(f"{what} has NaN or infinite values; the model produced non-finite activations")
    return X


class SLRProbe(ClassifierMixin, BaseEstimator):
    """L1 logistic-regression probe; labels 1 = harmful, 0 = benign.

    After :meth:`fit`: ``coef_`` ``[1, D]`` and ``intercept_`` ``[1]`` in the original activation
    space (also as :attr:`w`, :attr:`b`), ``mean_``/``scale_`` of the scaler (``None`` when not
    standardised), ``n_nonzero_``, ``n_iter_``, ``converged_``, ``classes_ = [0, 1]``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 500, standardize: bool = True, tol: float = 1e-4,
                 random_state: int | None = 0):
        self.C = C
        self.max_iter = max_iter
        self.standardize = standardize
        self.tol = tol
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Any, y: Any) -> SLRProbe:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        X = _check_X(X)
        y = as_binary_labels(y, len(X))
        if len(np.unique(y)) < 2:
            raise ProbeError("the probe needs both harmful and benign examples to fit; got one class only")
        if self.standardize:
            mean = X.mean(axis=0)
            scale = X.std(axis=0)
            scale[scale < 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
            Z = (X - mean) / scale
        else:
            mean = scale = None
            Z = X
        clf = LogisticRegression(solver="saga", C=self.C, max_iter=self.max_iter, tol=self.tol,
                                 random_state=self.random_state, **_l1_kwargs())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(Z, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        w_std = clf.coef_.reshape(-1).astype(np.float64)
        b_std = float(clf.intercept_.reshape(-1)[0])
        if self.standardize:
            w = w_std / scale
            b = b_std - float(np.dot(w_std, mean / scale))
        else:
            w, b = w_std, b_std
        self.coef_ = w.reshape(1, -1)
        self.intercept_ = np.array([b])
        self.mean_, self.scale_ = mean, scale
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.n_nonzero_ = int(np.count_nonzero(w_std))
        self.n_iter_ = int(np.max(clf.n_iter_))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ProbeError("this probe is not fitted yet; call fit(X, y) or SLRProbe.load(path)")

    # ------------------------------------------------------------------ the direction
    @property
    def w(self) -> np.ndarray:
        """Weight vector ``[D]`` in the original activation space."""
        self._check_fitted()
        return self.coef_[0]

    @property
    def b(self) -> float:
        self._check_fitted()
        return float(self.intercept_[0])

    @property
    def direction(self) -> tuple[np.ndarray, float]:
        """``(w, b)`` such that ``h @ w + b`` is the harmful logit of a raw hidden state ``h``."""
        return self.w, self.b

    # ------------------------------------------------------------------ predicting
    def decision_function(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise ProbeError(f"X has {X.shape[1]} features but the probe was fitted on {self.n_features_in_}; "
                             "use activations of the same model family and layer")
        return X @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X: Any) -> np.ndarray:
        z = self.decision_function(X)
        p1 = 0.5 * (1.0 + np.tanh(0.5 * z))  # a sigmoid that cannot overflow
        return np.stack([1.0 - p1, p1], axis=1)

    def predict(self, X: Any) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(np.int64)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        y = as_binary_labels(y, len(np.asarray(X)))
        pred = self.predict(X)
        if sample_weight is None:
            return float(np.mean(pred == y))
        sw = np.asarray(sample_weight, dtype=np.float64)
        return float(np.sum(sw * (pred == y)) / np.sum(sw))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-able metadata) of a fitted probe."""
        self._check_fitted()
        arrays = {"w": self.coef_[0].astype(np.float64), "b": self.intercept_.astype(np.float64)}
        if self.mean_ is not None:
            arrays["mean"], arrays["scale"] = self.mean_.astype(np.float64), self.scale_.astype(np.float64)
        meta = {"params": self.get_params(), "n_features": int(self.n_features_in_), "n_nonzero": self.n_nonzero_,
                "n_iter": self.n_iter_, "converged": bool(self.converged_)}
        return arrays, meta

    @classmethod
    def from_dict(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> SLRProbe:
        params = dict(meta.get("params") or {})
        probe = cls(**{k: v for k, v in params.items() if k in ("C", "max_iter", "standardize", "tol", "random_state")})
        w = np.asarray(arrays["w"], dtype=np.float64)
        probe.coef_ = w.reshape(1, -1)
        probe.intercept_ = np.asarray(arrays["b"], dtype=np.float64).reshape(1)
        probe.mean_ = np.asarray(arrays["mean"], dtype=np.float64) if "mean" in arrays else None
        probe.scale_ = np.asarray(arrays["scale"], dtype=np.float64) if "scale" in arrays else None
        probe.classes_ = np.array([0, 1])
        probe.n_features_in_ = int(w.shape[0])
        probe.n_nonzero_ = int(meta.get("n_nonzero", np.count_nonzero(w)))
        probe.n_iter_ = int(meta.get("n_iter", 0))
        probe.converged_ = bool(meta.get("converged", True))
        return probe

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``PATH.safetensors`` and ``PATH.json``; returns the safetensors path."""
        return save_probes(path, {0: self}, metadata, single=True)

    @classmethod
    def load(cls, path: str | Path) -> SLRProbe:
        probes, _ = load_probes(path)
        if len(probes) != 1:
            raise ProbeError(f"{path} holds {len(probes)} probes; use probes.slr.load_probes for a per-layer file")
        return next(iter(probes.values()))


# ---------------------------------------------------------------------------------------------
# persistence of a set of per-layer probes


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_probes(path: str | Path, probes: Mapping[int, SLRProbe], metadata: Mapping[str, Any] | None = None,
                *, single: bool = False) -> Path:
    """Save per-layer probes to ``PATH.safetensors`` (tensors ``layer.<i>.w`` / ``.b`` / ``.mean`` /
    ``.scale``, float64) and ``PATH.json`` (format, settings, per-layer metadata, ``metadata``).

    ``w`` and ``b`` are in the original activation space: ``logit = h @ w + b``.
    """
    from safetensors.numpy import save

    stem = _stem(path)
    tensors: dict[str, np.ndarray] = {}
    layers_meta: dict[str, Any] = {}
    for layer, probe in sorted(probes.items()):
        arrays, meta = probe.to_dict()
        for k, v in arrays.items():
            tensors[f"layer.{int(layer)}.{k}"] = np.ascontiguousarray(v)
        layers_meta[str(int(layer))] = meta
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "single": single,
           "convention": "logit = h @ w + b on raw hidden states; label 1 = harmful, 0 = benign",
           "layers": layers_meta, "metadata": dict(metadata or {})}
    atomic_write(stem.with_suffix(".safetensors"), save(tensors, metadata={"format": FORMAT}))
    atomic_write(stem.with_suffix(".json"), json.dumps(doc, indent=1, default=_json_default).encode("utf-8"))
    return stem.with_suffix(".safetensors")


def load_probes(path: str | Path) -> tuple[dict[int, SLRProbe], dict[str, Any]]:
    """Load ``PATH.safetensors`` + ``PATH.json`` -> ({layer: probe}, the JSON document)."""
    from safetensors.numpy import load_file

    stem = _stem(path)
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (st, js):
        if not f.is_file():
            raise ProbeError(f"probe file {f} not found; pass the path written by save_probes / SLRProbe.save")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except Exception as exc:  # safetensors raises its own types for a corrupt file
        raise ProbeError(f"probe file {stem}: unreadable ({' '.join(str(exc).split())}); save it again") from None
    if doc.get("format") != FORMAT:
        raise ProbeError(f"{js} is not a safequant probe file (format {doc.get('format')!r})")
    probes: dict[int, SLRProbe] = {}
    for key, meta in doc.get("layers", {}).items():
        prefix = f"layer.{int(key)}."
        arrays = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if "w" not in arrays or "b" not in arrays:
            raise ProbeError(f"probe file {st} lacks the tensors of layer {key}; save it again")
        probes[int(key)] = SLRProbe.from_dict(arrays, meta)
    return probes, doc


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# fit + evaluate


def _auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, scores))


def evaluate(probe: SLRProbe, X: Any, y: Any) -> dict[str, Any]:
    """Accuracy and AUROC of ``probe`` on (X, y)."""
    y = as_binary_labels(y)
    scores = probe.decision_function(X)
    return {"accuracy": float(np.mean((scores > 0).astype(np.int64) == y)), "auroc": _auroc(y, scores), "n": int(len(y))}


def fit_slr(
    X: Any,
    y: Any,
    *,
    split: tuple[Sequence[int], Sequence[int]] | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 500,
    standardize: bool = True,
) -> tuple[SLRProbe, dict[str, Any]]:
    """Fit one probe on the training split and score it on the held-out split.

    Returns ``(probe, metrics)`` with metrics ``accuracy``, ``auroc`` (held-out), ``train_accuracy``,
    ``n_train``, ``n_test``, ``nonzero`` (non-zero weights), ``n_features``, ``n_iter``,
    ``converged``, ``fit_seconds``.
    """
    X = _check_X(X)
    y = as_binary_labels(y, len(X))
    train, test = split if split is not None else stratified_split(y, test_size, seed)
    train, test = np.asarray(train), np.asarray(test)
    t0 = time.perf_counter()
    probe = SLRProbe(C=C, max_iter=max_iter, standardize=standardize, random_state=seed).fit(X[train], y[train])
    seconds = time.perf_counter() - t0
    held = evaluate(probe, X[test], y[test])
    return probe, {"accuracy": held["accuracy"], "auroc": held["auroc"],
                   "train_accuracy": probe.score(X[train], y[train]),
                   "n_train": int(len(train)), "n_test": int(len(test)), "nonzero": probe.n_nonzero_,
                   "n_features": int(X.shape[1]), "n_iter": probe.n_iter_, "converged": probe.converged_,
                   "fit_seconds": round(seconds, 4)}
