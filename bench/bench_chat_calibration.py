"""What the chat-calibration cache saves: ``load_calibration`` of a ``chat:`` source, cold (the
model answers every request it needs) against warm (the answers read back from the cache), on
the same model in one process, plus the cost of the model fingerprint that keys the cache.

    OMP_NUM_THREADS=1 python bench/bench_chat_calibration.py --model smol-chat --samples 64 --len 256

The cache folder is a fresh temporary one (``--cache-dir`` to keep it), so "cold" really is
cold whatever the user's cache holds. Prints medians of ``--repeats`` warm loads and checks
that the warm load gives the cold load's windows (same CalibrationData fingerprint).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from harness.calibration_data import CalibrationSpec, load_calibration
    from harness.models import fingerprint_model, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smol-chat")
    ap.add_argument("--source", default="chat:calibration")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="warm loads (and fingerprints) timed; the median is printed")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a fresh temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    spec = CalibrationSpec(args.source, n_samples=args.samples, seq_len=args.len, seed=0)

    prints = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        fingerprint_model(loaded.model, loaded.tokenizer)
        prints.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        started = time.perf_counter()
        cold = load_calibration(spec, loaded.tokenizer, loaded.model, cache_dir=cache)
        cold_s = time.perf_counter() - started
        warm = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            again = load_calibration(spec, loaded.tokenizer, loaded.model, cache_dir=cache)
            warm.append(time.perf_counter() - started)
            assert again.fingerprint == cold.fingerprint, "the cached text gave other windows"
    warm_s = statistics.median(warm)
    print(f"{args.model}, {args.source}, {args.samples} x {args.len} tokens, {args.threads} thread(s)")
    print(f"fingerprint_model: median {statistics.median(prints) * 1000:.0f} ms of {args.repeats}")
    print(f"load_calibration cold (answers generated): {cold_s:.1f} s")
    print(f"load_calibration warm (answers from the cache): median {warm_s:.2f} s of {args.repeats} "
          f"(min {min(warm):.2f}, max {max(warm):.2f})")
    print(f"cold / warm: {cold_s / warm_s:.0f}x; windows identical (fingerprint {cold.fingerprint})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
