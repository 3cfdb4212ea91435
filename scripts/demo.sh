#!/usr/bin/env bash
# The main job end to end on the embedded default: local executor, SQLite, a
# real pacemaker fit (100 functions per element on TensorFlow), holdout
# evaluation, and a registered potential in output/potentials/. The data: the
# real DFT copper of ../shared where present, else 30 EMT copper cells made on the spot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
data=()
# `demo.sh --loop 3`: the active-learning loop labels with EMT, so it starts from EMT data too.
if [ -f ../shared/data/cu_fhiaims_105.extxyz ] && [[ " $* " != *" --loop"* ]]; then
  data=(--data ../shared/data/cu_fhiaims_105.extxyz)
fi
.venv/bin/autopipec-hpc demo "${data[@]}" "$@"
