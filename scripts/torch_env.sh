# Sourced by the scripts: where the LibTorch environment lives.
#   ZEROQ_VENV  the Python virtual environment holding the pinned torch wheel
#               (default: ~/.local/share/zeroq/venv-torch-2.15.0; CMake looks
#               there too, so a plain `cmake -S . -B build` finds LibTorch).
#   ZEROQ_PYTHON  its Python (torch 2.15), for the model scripts and checks.
: "${ZEROQ_VENV:=${XDG_DATA_HOME:-$HOME/.local/share}/zeroq/venv-torch-2.15.0}"
ZEROQ_PYTHON="$ZEROQ_VENV/bin/python"
export ZEROQ_VENV ZEROQ_PYTHON
