#!/usr/bin/env bash
# Set everything up and run the test suite (CPU, a real local Ray, tiny models). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
