#!/usr/bin/env bash
# The quantization environment (.venv-quant): this package with the `quant` extra (GPTQModel 7.6.0,
# optimum) and its test extras, e.g.
#   .venv-quant/bin/python -m pytest -q tests/quant
# Apart from .venv because gptqmodel pins numpy==2.2.6; requirements/quant.txt keeps torch at 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_CONSTRAINT="$PWD/requirements/quant.txt" VENV=.venv-quant bash scripts/setup.sh "quant,test"
