#!/usr/bin/env bash
# Create .venv (if missing) and install coati_ray with the given extras, e.g. `scripts/setup.sh test`.
# VENV picks another environment folder (scripts/setup_vllm_cpu.sh uses .venv-vllm).
#
# torch is installed first and pinned, so that pip never replaces it while resolving the rest:
# TORCH_SPEC (default torch==2.13.0) picks the build; on a CUDA machine the same pin gives the
# CUDA build from PyPI, on a CPU-only machine point pip at a CPU wheel index (PIP_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
say() { echo "setup: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Run pip quietly; on failure show its output (less this machine's noise about local wheel dirs).
quiet() {
  local log; log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    grep -vE "^WARNING: Location .* is ignored" "$log" >&2 || true
    rm -f "$log"; echo "setup failed: $*" >&2; return 1
  fi
  rm -f "$log"
}
if python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_SPEC:-torch==2.13.0}'.split('==')[-1] else 1)" 2>/dev/null; then
  say "${TORCH_SPEC:-torch==2.13.0} is installed in $VENV"
else
  say "installing ${TORCH_SPEC:-torch==2.13.0} into $VENV (first: pip must not replace it later; a minute or two)"
  quiet pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
started=$SECONDS
if [ -n "$EXTRAS" ]; then
  say "installing coati_ray with the extras [$EXTRAS] and what they pin (ray, transformers, peft, datasets, ...; a few minutes on first run)"
  quiet pip install -q -e ".[$EXTRAS]"
else
  say "installing coati_ray and what it pins (ray, transformers, peft, datasets, ...; a few minutes on first run)"
  quiet pip install -q -e .
fi
say "coati_ray installed ($((SECONDS - started)) s); activate the environment with '. $VENV/bin/activate'"
