#!/usr/bin/env bash
# Set everything up and run the main job on the embedded defaults (local Ray, tiny model, demo data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python launchers/demo.py "$@"
