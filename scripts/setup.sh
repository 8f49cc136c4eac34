#!/usr/bin/env bash
# Set up bioexp on a fresh machine: a virtual environment in .venv with the project installed
# (editable, with the test tools), and Fashion-MNIST from the OS package where apt-get can
# install it. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import bioexp, pytest, ruff, tensorboard, sqlalchemy, alembic, mkdocs, mkdocstrings_handlers.python, material, nbclient, ipykernel
import importlib.util; assert importlib.util.find_spec('mlflow')" 2>/dev/null; then
    echo "setup: installing bioexp and its dependencies into .venv (torch is a large download)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
fi

# Fashion-MNIST for machines without internet (Debian/Ubuntu package dataset-fashion-mnist).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    if $SUDO true 2>/dev/null; then
        echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
        $SUDO apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway"
        $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
            || echo "setup: could not install dataset-fashion-mnist"
    else
        echo "setup: not root, so dataset-fashion-mnist was not installed (runs need data.download=true)"
    fi
fi
echo "setup: done ($(.venv/bin/bioexp --version))"
