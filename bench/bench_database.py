"""SQLite against PostgreSQL: rows read by `prepare`, records written by concurrent
writers, and the peak memory of `prepare` as rows grow.

Run from the project root, with the test server up:

    bash scripts/postgres/up.sh && source /tmp/autopipec-pg/env.sh
    .venv/bin/python bench/bench_database.py                  # 100,000 structures
    .venv/bin/python bench/bench_database.py --n 20000        # quicker

Data: the 105 DFT Cu cells of ../shared cycled to N, each rattled (1 to 96
atoms). For each backend, in the same run:

(a) rows per second that `prepare` reads: the dataset stage streams the ready rows
    twice (ZBL pass, then targets and writers); the bare stream is timed alone
    (best of 2), and the whole `prepare` once;
(b) records per second under 8 concurrent writers: 8 processes each claim a
    generation and move its record 200 times (RUNNING updates under the records
    lock, as jobs do);
(c) peak RSS of `autopipec-hpc prepare` in a fresh process at N/10 and N rows;
    target: N / (N/10) at most 1.2x, as for SQLite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, rattled_copies, verdict  # noqa: E402

from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager  # noqa: E402
from autopipec_hpc.store.database import patiently  # noqa: E402

WRITERS = 8
UPDATES = 200

_MAXRSS = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def new_postgres() -> str | None:
    url = os.environ.get("AUTOPIPEC_TEST_POSTGRES")
    if not url:
        return None
    from autopipec_hpc.testing.postgres import new_database

    return new_database(url, prefix="bench")


def fill(target: str, xyz: Path) -> float:
    start = time.perf_counter()
    DatabaseManager(target).import_files([xyz])
    return time.perf_counter() - start


def stream_rate(target: str, repeats: int = 2) -> float:
    best = float("inf")
    db = DatabaseManager(target)
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in db.iter_structures())
        best = min(best, time.perf_counter() - start)
    return n / best


def prepare_seconds(target: str, out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "autopipec-hpc"), "prepare", "--db", target,
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"prepare failed: {done.stderr}")
    return time.perf_counter() - start


def _writer(args: tuple[str, str, int]) -> int:
    target, root, k = args
    db = DatabaseManager(target)
    number, run_dir = db.claim(None, lambda g: _folder(Path(root), g, k))
    for i in range(UPDATES):
        # As a job writes: retried while the database is busy (a writer can wait out the lock's timeout).
        patiently(lambda: db.update_record(number, run_dir, RecordState.RUNNING, values={"attempt": i}),
                  f"writer {k}")
    return UPDATES


def _folder(root: Path, generation: int, k: int) -> Path:
    path = root / f"gen-{generation:04d}-w{k}"
    path.mkdir(parents=True)
    return path


def writer_rate(target: str, root: Path) -> float:
    DatabaseManager(target).count()
    context = multiprocessing.get_context("spawn")
    with context.Pool(WRITERS) as pool:
        start = time.perf_counter()
        total = sum(pool.map(_writer, [(target, str(root), k) for k in range(WRITERS)]))
        return total / (time.perf_counter() - start)


def peak_rss_mb(target: str, out: Path) -> float:
    done = subprocess.run([sys.executable, "-c", _MAXRSS, str(Path(sys.executable).parent / "autopipec-hpc"),
                           "prepare", "--db", target, "--out", str(out)], capture_output=True, text=True)
    rc, kb = done.stdout.split()
    if rc != "0":
        sys.exit(f"prepare failed under the memory probe ({target})")
    return int(kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-database-"))
    import ase.io

    banner(f"SQLite vs PostgreSQL, {args.n:,} structures")
    print(machine_line())
    base = cu_structures()
    small, large = root / "small.extxyz", root / "large.extxyz"
    ase.io.write(small, rattled_copies(base, args.n // 10, seed=1))
    ase.io.write(large, rattled_copies(base, args.n, seed=2))
    backends = {"sqlite": (str(root / "small.db"), str(root / "large.db"))}
    pg_small, pg_large = new_postgres(), new_postgres()
    if pg_small and pg_large:
        backends["postgresql"] = (pg_small, pg_large)
    else:
        print("PostgreSQL: AUTOPIPEC_TEST_POSTGRES is not set (bash scripts/postgres/up.sh; source its env.sh)")
    print(f"{'backend':<11} {'import s':>9} {'stream rows/s':>14} {'prepare s':>10} {'prepare rows/s':>15} "
          f"{'records/s (8 writers)':>22} {'RSS N/10 MB':>12} {'RSS N MB':>9} {'ratio':>6}")
    for name, (db_small, db_large) in backends.items():
        fill(db_small, small)
        t_import = fill(db_large, large)
        rate = stream_rate(db_large)
        t_prepare = prepare_seconds(db_large, root / f"{name}-ds")
        writes = writer_rate(db_large, root / f"{name}-runs")
        rss_small = peak_rss_mb(db_small, root / f"{name}-mem-small")
        rss_large = peak_rss_mb(db_large, root / f"{name}-mem-large")
        ratio = rss_large / rss_small
        print(f"{name:<11} {t_import:>9.1f} {rate:>14,.0f} {t_prepare:>10.1f} {2 * args.n / t_prepare:>15,.0f} "
              f"{writes:>22,.0f} {rss_small:>12.1f} {rss_large:>9.1f} {ratio:>5.2f}x  {verdict(ratio <= 1.2)}",
              flush=True)
    print("prepare rows/s counts both streaming passes (2 x N rows); records/s: RUNNING updates under the lock")
    print(f"folders: {root}")


if __name__ == "__main__":
    main()
