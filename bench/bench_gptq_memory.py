"""GPTQ peak memory and time: safequant's `gptq` against llm-compressor's GPTQ on the same job.

Each job is one `safequant quantize` process under ``/usr/bin/time -v`` on one thread (load the
model, draw the calibration windows, quantize, save), so the only difference between them is
the quantizer:

* ``safequant``: ``--method gptq`` (quantizers/gptq.py), saved as a safequant variant folder;
* ``llmcompressor``: ``--method llmcompressor --option recipe=gptq``, i.e. llm-compressor's own
  ``oneshot`` with a GPTQModifier at the same scheme (same bits, group size, symmetry, act order
  with static groups, dampening 0.01, block 128) on the same calibration batches, saved as its
  compressed-tensors folder. It runs in the llm-compressor environment
  (``scripts/make_llmc_venv.sh``); by default the safequant job runs there too, so both see the
  same transformers and torch.

It prints peak RSS, wall, user+system CPU time of each and their ratios (safequant /
llm-compressor), and leaves both folders under ``--work`` so that one audit can compare their
perplexity and refusals (the command is printed). ``--code DIR`` runs the safequant job with
another checkout's code (e.g. ``/work/main``) to compare implementations:

    python bench/bench_gptq_memory.py [--model smol-chat] [--scheme w4a16g64] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext2_test.raw"
LLMC_PYTHON = REPO / ".venv-llmc" / "bin" / "python"
#: /usr/bin/time -v fields -> our names
TIME_FIELDS = {"Maximum resident set size (kbytes)": "peak_kib", "User time (seconds)": "user_s",
               "System time (seconds)": "sys_s", "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall"}


def parse_time_v(text: str) -> dict[str, float]:
    """Peak RSS (bytes), wall and CPU seconds from the report of ``/usr/bin/time -v``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            found[TIME_FIELDS[key]] = value.strip()
    missing = sorted(set(TIME_FIELDS.values()) - set(found))
    if missing:
        raise SystemExit(f"/usr/bin/time -v gave no {', '.join(missing)}:\n{text[-2000:]}")
    seconds = 0.0
    for part in found["wall"].split(":"):
        seconds = seconds * 60 + float(part)
    return {"peak_rss": int(found["peak_kib"]) * 1024, "wall_s": seconds,
            "cpu_s": float(found["user_s"]) + float(found["sys_s"])}


def quantize_job(python: str, code: str, method_args: list[str], args, out: Path) -> dict[str, float]:
    """One `safequant quantize` process under /usr/bin/time -v, one thread; its measurements."""
    command = ["/usr/bin/time", "-v", python, "-m", "harness.cli", "quantize", "--model", args.model,
               "--scheme", args.scheme, *method_args, "--calib-text", str(WIKITEXT), "--calib-span", "0.4:1",
               "--calib-samples", str(args.samples), "--calib-len", "256", "--calib-batch", "4",
               "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse_time_v(done.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smol-chat", help="subject (default smol-chat)")
    ap.add_argument("--scheme", default="w4a16g64", help="weight-only scheme both can do (default w4a16g64)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens (default 16)")
    ap.add_argument("--code", default=str(REPO), help="checkout whose safequant gptq runs (default this one)")
    ap.add_argument("--python", default=str(LLMC_PYTHON),
                    help="interpreter of the safequant job (default the llm-compressor environment's, as the other)")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON), help="interpreter with llmcompressor installed")
    ap.add_argument("--work", default="/tmp/safequant-bench-gptq", help="folder for the two quantized outputs")
    ap.add_argument("--only", choices=("safequant", "llmcompressor"), help="run one job only")
    args = ap.parse_args()
    if not WIKITEXT.is_file():
        raise SystemExit(f"calibration text {WIKITEXT} not found (../shared/data)")
    work = Path(args.work)
    jobs = {"safequant": (args.python, args.code, ["--method", "gptq"]),
            "llmcompressor": (args.llmc_python, str(REPO), ["--method", "llmcompressor", "--option", "recipe=gptq"])}
    results = {}
    for name, (python, code, method_args) in jobs.items():
        if args.only in (None, name):
            results[name] = quantize_job(python, code, method_args, args, work / name)
            print(json.dumps({"job": name, **results[name]}), flush=True)
    print(f"\n{args.model}, {args.scheme}, {args.samples} x 256 WikiText-2 calibration tokens, one thread, "
          f"safequant code {args.code}")
    print(f"{'job':<15}{'peak RSS GiB':>14}{'wall s':>10}{'CPU s':>10}")
    for name, r in results.items():
        print(f"{name:<15}{r['peak_rss'] / GIB:>14.3f}{r['wall_s']:>10.1f}{r['cpu_s']:>10.1f}")
    if len(results) == 2:
        s, c = results["safequant"], results["llmcompressor"]
        print(f"{'ratio s/l':<15}{s['peak_rss'] / c['peak_rss']:>14.2f}{s['wall_s'] / c['wall_s']:>10.2f}"
              f"{s['cpu_s'] / c['cpu_s']:>10.2f}")
        print("\nquality of both (run in the llm-compressor environment):\n  "
              + " ".join([re.sub(r"^.*/", ".venv-llmc/bin/", args.llmc_python), "-m", "harness.cli", "audit",
                          "--model", args.model, "--variants", "fp", f"safequant={work / 'safequant'}",
                          f"llmcompressor={work / 'llmcompressor'}", "--prompt-sets", "harmful", "benign",
                          "--data-dir", str(DATA), "--perplexity-text", str(WIKITEXT), "--ppl-window", "512",
                          "--ppl-stride", "512", "--no-probes", "--pairs", "safequant=llmcompressor"]))


if __name__ == "__main__":
    sys.exit(main())
