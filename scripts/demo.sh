#!/usr/bin/env bash
# Set up, then optimize and train a small model on the embedded corpus: eager vs chronicals.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m chronicals_fx.cli demo "$@"
