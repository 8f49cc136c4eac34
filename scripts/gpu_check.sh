#!/usr/bin/env bash
# bioexp's GPU check, in one call on a machine with CUDA (under 8 minutes on one H100 or H200,
# no internet): the CUDA tests, one epoch of every registered model on a Fashion-MNIST subset on
# CUDA (against the CPU run of the same seed), the Krotov phase benchmark (eager, CUDA graphs,
# TF32), the Gupta threshold, bench_feedback.py and bench_loop.py on CUDA, and the seed_hybrid
# recipe's wall time. Writes gpu_check.json and prints a table with the card's name.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR] [-- options of scripts/gpu_check.py]
#
# WHEELS_DIR (default: $BIOEXP_WHEELS, else shared/wheels, else .whl, where present) holds wheels
# of what the machine lacks (hydra-core, omegaconf, antlr4-python3-runtime, ...): they are
# installed with pip --no-index into /tmp/bioexp-site. The project itself is installed with
# `pip install --no-deps -e .` (falling back to PYTHONPATH). $PYTHON chooses the interpreter.
# Without CUDA it says so in one line and exits 3, having run nothing.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false, or torch is" \
         "missing); nothing was run" >&2
    exit 3
fi

wheels=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then wheels=$1; shift; fi
[ "${1:-}" = "--" ] && shift
for candidate in "$wheels" "${BIOEXP_WHEELS:-}" shared/wheels .whl; do
    if [ -n "$candidate" ] && compgen -G "$candidate/*.whl" >/dev/null; then
        wheels=$candidate
        break
    fi
done
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check: installing the wheels in $wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bioexp-site "$wheels"/*.whl || exit 2
    export PYTHONPATH=/tmp/bioexp-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    echo "gpu_check: pip install -e . failed; using the source tree through PYTHONPATH"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
