#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, start a single-node SLURM, run
# pytest (real pacemaker fits and real SLURM jobs included), stop SLURM.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slurm"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
started_slurm=0
if [ -x scripts/slurm/up.sh ] && [ "${AUTOPIPEC_NO_SLURM:-0}" != 1 ]; then
  bash scripts/slurm/up.sh
  started_slurm=1
  export AUTOPIPEC_REQUIRE_SLURM=1   # the SLURM tests fail rather than skip
fi
stop() { if [ "$started_slurm" = 1 ]; then bash scripts/slurm/down.sh || true; fi; }
trap stop EXIT
.venv/bin/python -m pytest "$@"
