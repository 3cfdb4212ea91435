#!/usr/bin/env bash
# Create .venv (once) and install the project with pacemaker, its TensorFlow
# evaluator (CPU build), PostgreSQL support and the test tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -e ".[train-cpu,postgresql,test]"
# tensorpotential and tf_keras name CUDA TensorFlow as a dependency; on a CPU
# host tensorflow-cpu (above) serves them, so they go in without dependencies.
"${PIP[@]}" --no-deps tensorpotential==0.6.2.1 tf_keras==2.20.1
# GPAW (the `dft` extra), the DFT code the labelling tests run. Its build compiles C++
# with gcc as C unless told g++ (scripts/gpaw-siteconfig.py); it takes minutes once, then
# pip's cache holds the wheel. Skipped once it imports.
if ! .venv/bin/python -c "import gpaw, gpaw_data" 2>/dev/null; then
  GPAW_CONFIG="$PWD/scripts/gpaw-siteconfig.py" "${PIP[@]}" -e ".[dft]"
fi
