#!/usr/bin/env bash
# The colossalai environment (.venv-colossalai): requirements/colossalai.txt's set (torch 2.5.1,
# colossalai 0.5.0, transformers 4.51.3, peft 0.13.2) and this package with its test extras, e.g.
#   RAY_AUTH_MODE=disabled .venv-colossalai/bin/python -m pytest -q tests/colossalai_booster
#
# scripts/setup.sh does the work: torch 2.5.1 first, then the package, with the pinned file as
# pip's constraints, so nothing replaces torch, transformers or peft. PYTHON picks the interpreter
# (3.10-3.12; default python3). torch 2.5.1 from PyPI is its CUDA build; on a CPU-only machine
# point pip at a CPU wheel index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) to download less.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_CONSTRAINT="$PWD/requirements/colossalai.txt" TORCH_SPEC=torch==2.5.1 VENV=.venv-colossalai \
  bash scripts/setup.sh "colossalai,test"
.venv-colossalai/bin/python - <<'PY'
import colossalai, peft, torch, transformers
got = {"torch": torch.__version__.split("+")[0], "colossalai": colossalai.__version__,
       "transformers": transformers.__version__, "peft": peft.__version__}
want = {"torch": "2.5.1", "colossalai": "0.5.0", "transformers": "4.51.3", "peft": "0.13.2"}
assert got == want, f"the colossalai environment drifted: {got} != {want}"
PY
