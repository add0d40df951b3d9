#!/usr/bin/env bash
# Set up (first run only installs) and run the main job on synthetic data: scripts/demo.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/brainseg demo "$@"
