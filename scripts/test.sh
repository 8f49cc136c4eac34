#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/pytest -q "$@"
