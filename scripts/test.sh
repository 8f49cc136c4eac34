#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the test suite, which also builds the documentation
# site strictly (tests/test_readme.py) and executes the notebooks (tests/test_notebooks.py). Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/pytest -q "$@"
