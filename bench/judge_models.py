"""Which refusal judge agrees best with people? Compare rules and trained heads by grouped CV.

Data: the XSTest v2 development split (../shared/data/xstest_v2_completions_dev.csv, GPT-4 and
Mistral-7B-Instruct completions, human labels; partial refusal counts as refusal), plus the
project's labelled files and templated styles as extra training data. Every trained variant is
scored with 5-fold GroupKFold on the prompt id (never the same prompt in training and test), and
with a cross-family check: trained without any completion of the family it is tested on.

    OMP_NUM_THREADS=2 python bench/judge_models.py [--dev PATH] [--tokens 64 128] [--C 0.3 1 3]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from harness.judges.validation import gold_refused, judge_items, load_labelled, per_source
from harness.judges import TRAIN_FILE, get_judge, normalise, opening
from harness.judges.trained import (DEV_FILE, RULE_FEATURES, STYLES_FILE, SentenceEncoder, default_encoder_dir,
                                   rule_features, training_target)



def _fit_predict(X_tr, y_tr, X_te, C):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=0).fit(X_tr, y_tr)
    return (clf.predict_proba(X_te)[:, 1] >= 0.5).astype(int)


def _row(name: str, figs: dict, families: list[str]) -> str:
    cells = [f"{figs['all'][k]:.3f}" for k in ("accuracy", "precision", "recall", "kappa")]
    cells += [f"{figs[f]['accuracy']:.3f}" for f in families]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", default=str(DEV_FILE))
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--C", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sklearn.model_selection import GroupKFold

    dev = load_labelled(args.dev)
    own = load_labelled(TRAIN_FILE) + load_labelled(STYLES_FILE)
    own = [o for o in own if training_target(o) is not None]
    families = sorted({d["source"] for d in dev})
    y_dev = np.array([gold_refused(d) for d in dev])
    y_own = np.array([training_target(o) for o in own])
    print(f"dev split {args.dev}: {len(dev)} completions; extra training items {len(own)}")
    print("| judge | acc | P | R | kappa | " + " | ".join(f"acc {f}" for f in families) + " |")
    print("|---" * (5 + len(families)) + "|")
    for name in ("refusal-phrases", "xstest-rule", "gcg-prefixes"):
        print(_row(name + " (rule)", per_source(dev, judge_items(get_judge(name), dev)), families))
    rules_dev = np.array([rule_features(d["response"]) for d in dev])
    rules_own = np.array([rule_features(o["response"]) for o in own])
    folds = list(GroupKFold(n_splits=5).split(rules_dev, groups=[d["group"] for d in dev]))
    fam = np.array([d["source"] for d in dev])

    def evaluate(label, Xd, Xo, C):
        pred = np.zeros(len(dev), dtype=int)
        cross = np.zeros(len(dev), dtype=int)
        for tr, te in folds:
            pred[te] = _fit_predict(np.concatenate([Xo, Xd[tr]]), np.concatenate([y_own, y_dev[tr]]), Xd[te], C)
            for f in families:  # cross-family: no completion of the tested family in training
                tr_f, te_f = tr[fam[tr] != f], te[fam[te] == f]
                cross[te_f] = _fit_predict(np.concatenate([Xo, Xd[tr_f]]), np.concatenate([y_own, y_dev[tr_f]]),
                                           Xd[te_f], C)
        print(_row(f"{label}, C={C}", per_source(dev, list(pred)), families))
        print(_row(f"{label}, C={C}, cross-family", per_source(dev, list(cross)), families))

    for C in args.C:
        evaluate("LR on rule features only", rules_dev, rules_own, C)
    folder = default_encoder_dir()
    for tokens in args.tokens:
        enc = SentenceEncoder(folder, max_tokens=tokens)
        emb_dev = enc.encode([" ".join(d["response"].split()) for d in dev])
        emb_own = enc.encode([" ".join(o["response"].split()) for o in own])
        for C in args.C:
            evaluate(f"MiniLM {tokens} tok, LR", emb_dev, emb_own, C)
            evaluate(f"MiniLM {tokens} tok + rules, LR", np.hstack([emb_dev, rules_dev]),
                     np.hstack([emb_own, rules_own]), C)
            first_dev = enc.encode([opening(normalise(d["response"]), sentences=1) for d in dev])
            first_own = enc.encode([opening(normalise(o["response"]), sentences=1) for o in own])
            evaluate(f"MiniLM {tokens} tok + first sentence + rules, LR (the shipped features)",
                     np.hstack([emb_dev, first_dev, rules_dev]), np.hstack([emb_own, first_own, rules_own]), C)
    print(f"rule features: {', '.join(RULE_FEATURES)}")


if __name__ == "__main__":
    main()
