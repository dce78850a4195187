#!/usr/bin/env bash
# The peer environment (.venv-peer): TRL 1.12's PPOTrainer (trl.experimental.ppo) with the pins of
# requirements/peer.txt, then this package, for scripts/peer_trl_ppo.py and scripts/bench_peer.py:
#   bash scripts/setup_peer.sh
#   .venv-peer/bin/python scripts/peer_trl_ppo.py --steps 7 --prompts_per_step 16 --new_tokens 48
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0; on a CPU-only machine
# point pip at a CPU wheel index with PIP_INDEX_URL), so that resolving trl never replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-peer}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
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
if [ ! -x "$VENV/bin/python" ]; then
  echo "[1/5] creating $VENV"
  "$PYTHON" -m venv "$VENV"
else
  echo "[1/5] $VENV exists; updating it"
fi
PY="$VENV/bin/python"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_SPEC}'.split('==')[-1] else 1)" 2>/dev/null; then
  echo "[2/5] $TORCH_SPEC already installed"
else
  echo "[2/5] installing $TORCH_SPEC"
  quiet "$PY" -m pip install -q "$TORCH_SPEC"
fi
echo "[3/5] installing requirements/peer.txt (trl 1.12.0, transformers 5.24.0, accelerate, datasets, ...)"
quiet "$PY" -m pip install -q -r requirements/peer.txt
echo "[4/5] installing coati_ray (pip install -e ., constrained by requirements/peer.txt)"
quiet "$PY" -m pip install -q -c requirements/peer.txt -e .
echo "[5/5] checking the environment"
quiet "$PY" -m pip check
TRL_EXPERIMENTAL_SILENCE=1 "$PY" -c "
import coati_ray.presets, torch, transformers, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer
print('$VENV ready: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)
" || { echo "setup failed: trl's PPOTrainer or coati_ray does not import in $VENV" >&2; exit 1; }
