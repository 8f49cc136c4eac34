#!/usr/bin/env bash
# The main job, end to end: set up, then train the backprop MLP baseline on MNIST, or on
# Fashion-MNIST from the OS package where MNIST cannot be downloaded. Extra arguments are passed
# to `bioexp train` as Hydra overrides (e.g. model=cnn).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

DATA=mnist
if ! .venv/bin/bioexp data mnist --download; then
    DATA=fashion_mnist
    echo "main: MNIST could not be found or downloaded; using Fashion-MNIST from the OS package instead"
    .venv/bin/bioexp data fashion_mnist
fi
.venv/bin/bioexp train model=bp_mlp data=$DATA "$@"
echo "main: done; the run folder is the newest one under outputs/ (summary.json, plots/curves.png)"
