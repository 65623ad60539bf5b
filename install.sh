#!/usr/bin/env bash
# Create .venv and install codeling into it.
#   ./install.sh          the library and the `codeling` command
#   ./install.sh --dev    plus the test dependencies (pytest, transformers)
# On a machine without an NVIDIA GPU, the CPU build of torch is installed first, so that pip
# does not pull a multi-gigabyte CUDA build. An existing torch in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")"

extras=""
if [[ "${1:-}" == "--dev" ]]; then
    extras="[dev]"
fi

python_bin="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" install --quiet "torch>=2.5"
    else
        # NOTE: torch==2.13.0 resolves to the CPU build on machines that carry that wheel
        # locally; elsewhere, install the CPU wheel from PyTorch's CPU package index first.
        "${pip[@]}" install --quiet "torch==2.13.0"
    fi
fi
"${pip[@]}" install --quiet -e ".${extras}"
echo "installed: $(.venv/bin/python -c 'import torch, codeling; print("codeling", codeling.__version__, "torch", torch.__version__)')"
