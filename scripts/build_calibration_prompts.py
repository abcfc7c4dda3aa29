"""Write harness/data/prompts/calibration.jsonl: labelled prompts for prompt-based calibration.

Methods that calibrate on prompts rather than text (Q-realign's probe objective, the refusal
direction behind ``--base ablated``) need harmful and benign requests that are *not* evaluation
prompts. These come from the toy data's development split (held-out vocabulary x held-out
request frames: never trained on, never in the held-out evaluation sets); tests/test_prompts.py
checks that they stay disjoint from every evaluation set.

    python scripts/build_calibration_prompts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import toy_data  # noqa: E402

OUT = REPO / "harness" / "data" / "prompts" / "calibration.jsonl"


#: Development-split draws to pool: one draw has ~140 prompts per label; Q-realign's default
#: calibration mix (200 prompts, 75% harmful) needs 150 harmful, probes want more.
SEEDS = (toy_data.DEFAULT_SEED, toy_data.DEFAULT_SEED + 10, toy_data.DEFAULT_SEED + 20)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def main() -> None:
    dev: dict[str, list[str]] = {"harmful": [], "benign": []}
    seen = {_normalised(p) for p in toy_data.training_prompts()}  # never a prompt the toys trained on
    for seed in SEEDS:
        for label, prompts in toy_data.dev_examples(seed).items():
            for prompt in prompts:
                if _normalised(prompt) not in seen:
                    seen.add(_normalised(prompt))
                    dev[label].append(prompt)
    lines = []
    for label in ("harmful", "benign"):
        for i, prompt in enumerate(dev[label], 1):
            record = {"id": f"calib-{label}-{i:03d}", "prompt": prompt, "category": f"calibration-{label}", "label": label}
            lines.append(json.dumps(record, ensure_ascii=False))
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(dev['harmful'])} harmful, {len(dev['benign'])} benign)")


if __name__ == "__main__":
    main()
