#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, start a single-node SLURM and a
# PostgreSQL server, run pytest (real pacemaker fits, real SLURM jobs and real
# PostgreSQL included), stop both.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# The fast tier alone, with no cluster, server or pacemaker needed (tests/conftest.py
# skips what is absent):
#   .venv/bin/python -m pytest -n 2 -m "not slow and not slurm and not physics and not pacemaker"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# bootstrap.sh installed pacemaker: its tests fail rather than skip here.
export AUTOPIPEC_REQUIRE_PACEMAKER=1
# ... and GPAW (the `dft` extra): the DFT labelling tests fail rather than skip.
export AUTOPIPEC_REQUIRE_GPAW=1
started_slurm=0
started_pg=0
stop() {
  if [ "$started_slurm" = 1 ]; then bash scripts/slurm/down.sh || true; fi
  if [ "$started_pg" = 1 ]; then bash scripts/postgres/down.sh || true; fi
}
trap stop EXIT
if [ -x scripts/slurm/up.sh ] && [ "${AUTOPIPEC_NO_SLURM:-0}" != 1 ]; then
  bash scripts/slurm/up.sh
  started_slurm=1
  export AUTOPIPEC_REQUIRE_SLURM=1   # the SLURM tests fail rather than skip
fi
if [ "${AUTOPIPEC_NO_POSTGRES:-0}" != 1 ]; then
  bash scripts/postgres/up.sh
  started_pg=1
  # shellcheck disable=SC1091
  source "${AUTOPIPEC_PG_DIR:-/tmp/autopipec-pg}/env.sh"   # PGPASSFILE and AUTOPIPEC_TEST_POSTGRES
  export AUTOPIPEC_REQUIRE_POSTGRES=1
fi
.venv/bin/python -m pytest "$@"
