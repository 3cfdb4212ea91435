#!/usr/bin/env bash
# The main job end to end on the embedded default: local executor, SQLite,
# a small EMT copper dataset made on the spot, a real (small) pacemaker fit,
# holdout evaluation, and a registered potential in output/potentials/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/autopipec-hpc demo --site site_configs/local.yaml "$@"
