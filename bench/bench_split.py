"""Is the train/test split reproducible across databases and stratified? (issue 19 item 1)

Imports the 105 FHI-aims Cu structures into two fresh SQLite databases, prepares
each with seed 42 and prints the test counts, how many test structures the two
share (by source file and frame, since content is what must match) and each
config type's test count against its quota round(0.1 n), clamped to [1, n - 1].

    .venv/bin/python bench/bench_split.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CU_DATA, cu_structures

from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings

from autopipec_hpc.store import DatabaseManager


def test_keys(root: Path, name: str, seed: int) -> tuple[set[tuple[str, int]], Counter]:
    db = DatabaseManager(str(root / f"{name}.db"))
    db.import_files([CU_DATA])
    manifest = DatasetBuilder(DatasetSettings(seed=seed, write_extxyz=False)).prepare_dataset(
        db.ready_structures(), root / name)
    rows = {row.id: row for row in db.iter_rows()}
    keys = {(rows[i].get("source"), int(rows[i].get("frame"))) for i in manifest.test_ids}
    return keys, Counter(manifest.test_counts)


def main() -> None:
    cu_structures()  # exits with a message when the data is absent
    n_type = Counter(str(a.info.get("config_type", "default")) for a in cu_structures())
    with tempfile.TemporaryDirectory() as tmp:
        a, counts_a = test_keys(Path(tmp), "a", 42)
        b, counts_b = test_keys(Path(tmp), "b", 42)
    print(f"test structures: db a {len(a)}, db b {len(b)}; shared {len(a & b)}"
          f" -> {'REPRODUCIBLE' if a == b else 'NOT reproducible'}")
    print(f"{'config_type':24s} {'n':>4s} {'quota':>5s} {'a':>3s} {'b':>3s}")
    worst = 0
    for ctype, n in sorted(n_type.items()):
        quota = min(max(1, round(0.1 * n)), n - 1) if n >= 2 else 0
        worst = max(worst, abs(counts_a[ctype] - 0.1 * n), abs(counts_b[ctype] - 0.1 * n))
        print(f"{ctype:24s} {n:4d} {quota:5d} {counts_a[ctype]:3d} {counts_b[ctype]:3d}")
    print(f"largest |test - 0.1 n| over config types: {worst:.1f}"
          f" -> {'MET' if worst <= 1 else 'NOT MET'} (target: within 1)")


if __name__ == "__main__":
    main()
