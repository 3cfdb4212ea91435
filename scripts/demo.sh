#!/usr/bin/env bash
# The main job end to end on the embedded default: local executor, SQLite,
# a small EMT copper dataset made on the spot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
rm -rf example
.venv/bin/autopipec-hpc example-data --db example/structures.db
.venv/bin/autopipec-hpc prepare --db example/structures.db --out example/dataset
