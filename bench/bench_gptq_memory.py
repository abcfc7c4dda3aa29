"""Peak memory of the GPTQ weight step against the size of the model it quantizes.

Runs GPTQ (``quantizers.gptq``, W4A16 g64 by default) on SmolLM2-135M-Instruct in a child process
and prints the child's peak resident set size (``ru_maxrss``: model, calibration data, Hessians,
everything) next to the bytes of the model's parameters and of the process right after loading.
Run it once with this checkout and once with another (``--code DIR``) to compare implementations
on the same job:

    OMP_NUM_THREADS=1 python bench/bench_gptq_memory.py [--code /work/main] [--scheme w4a16g64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

GIB = 1024**3
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw"


def child(scheme: str, samples: int) -> None:
    import torch

    from harness.calibration_data import CalibrationSpec, load_calibration
    from harness.models import load_model
    from quantizers import QuantContext, build_quantizer

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    model = loaded.model
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    spec = CalibrationSpec(str(WIKITEXT), n_samples=samples, seq_len=256, batch_size=4, seed=0, span=(0.4, 1.0))
    batches = load_calibration(spec, loaded.tokenizer).batches
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    build_quantizer("gptq").apply(model, scheme, QuantContext(tokenizer=loaded.tokenizer, calibration_batches=batches))
    print(json.dumps({"param_bytes": param_bytes, "rss_after_load": loaded_rss,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout whose quantizers run")
    ap.add_argument("--scheme", default="w4a16g64")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.scheme, args.samples)
        return
    env = {**os.environ, "PYTHONPATH": args.code}
    out = subprocess.run([sys.executable, __file__, "--child", "--scheme", args.scheme, "--samples", str(args.samples)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"code {args.code}, gptq {args.scheme}, {args.samples} x 256 calibration tokens: parameters "
          f"{r['param_bytes'] / GIB:.3f} GiB, RSS after load {r['rss_after_load'] / GIB:.3f} GiB, peak "
          f"{r['peak_rss'] / GIB:.3f} GiB (peak / after load {r['peak_rss'] / r['rss_after_load']:.2f}x, "
          f"peak - after load {(r['peak_rss'] - r['rss_after_load']) / GIB:.3f} GiB)")


if __name__ == "__main__":
    main()
