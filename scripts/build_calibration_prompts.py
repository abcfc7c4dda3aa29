"""Write harness/data/prompts/calibration.jsonl: labelled prompts for prompt-based calibration.

Methods that calibrate on prompts rather than text (Q-realign's probe objective, the refusal
direction behind ``--base ablated``) need harmful and benign requests that are *not* evaluation
prompts. These are drawn (seeded) from toy-chat's safety-SFT prompts (``scripts/toy_data.py``):
harmful = the prompts whose trained response is a refusal, benign = the others. The toy models
were trained on them, the way a real model's calibration set (e.g. AdvBench plus Alpaca for
Q-realign's released probes) comes from the same distribution as its alignment data; the
held-out evaluation sets were written apart from them, and tests/test_prompts.py and
tests/test_calibration_data.py check that no evaluation prompt equals or nearly equals one.

    python scripts/build_calibration_prompts.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import toy_data  # noqa: E402

from harness.judges import RefusalPhraseJudge  # noqa: E402

OUT = REPO / "harness" / "data" / "prompts" / "calibration.jsonl"
#: Per label. Q-realign's default mix (200 prompts, 75% harmful) needs 150 harmful; its probes are
#: fitted on every record (the released probes used 500 + 500).
N_PER_LABEL = 250
SEED = 0


def main() -> None:
    judge = RefusalPhraseJudge()
    pools: dict[str, list[dict]] = {"harmful": [], "benign": []}
    for i, (prompt, response) in enumerate(toy_data.sft_examples()):
        label = "harmful" if judge.judge(prompt, response).refused else "benign"
        pools[label].append({"id": f"calib-{label}-{i:05d}", "prompt": prompt, "category": f"calibration-{label}",
                             "label": label})
    rng = random.Random(SEED)
    records = [r for label in ("harmful", "benign") for r in rng.sample(pools[label], N_PER_LABEL)]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {OUT} ({N_PER_LABEL} harmful, {N_PER_LABEL} benign)")


if __name__ == "__main__":
    main()
