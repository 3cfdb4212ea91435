"""Peak memory of ``autopipec-hpc prepare``: does it follow the largest structure,
not the number of structures?

Run from the project root (about two minutes):

    .venv/bin/python bench/bench_prepare_memory.py

Builds ASE SQLite databases in a temporary folder with the project's own
importer (``DatabaseManager.import_files``: one transaction, rows with energy
and forces as single-point results and status=TRAINING_READY / config_type
key-value pairs):

- N = 1,000 and 10 N = 10,000 small structures (the 105 FHI-aims Cu cells
  cycled, each with its own 0.02 Angstrom rattle, labels from the file);
- 1,000 rattled copies of the one 96-atom structure vs 1,000 1-atom structures.

Each ``autopipec-hpc prepare --db DB --out DIR`` runs in a fresh process,
started by a dedicated wrapper process that reports
``getrusage(RUSAGE_CHILDREN).ru_maxrss``, so no two measurements share a
process. A baseline (``autopipec-hpc prepare --help``: the same imports, no
work) shows how much of each peak is the interpreter and libraries.

Target: 10x the structures raises the peak RSS by at most 1.2x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, rattled_copies, verdict  # noqa: E402

TARGET = 1.2
N = 1000

# Runs the command in argv as its only child; prints that child's peak RSS.
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kib": ru.ru_maxrss,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "stderr": p.stderr[-2000:]}))
"""


def cli() -> list[str]:
    script = Path(sys.executable).parent / "autopipec-hpc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autopipec_hpc.cli"]


def measure(args: list[str]) -> dict:
    """Peak RSS (MiB) and wall time of ``autopipec-hpc ARGS`` in a fresh process tree."""
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cli(), *args], capture_output=True, text=True, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        sys.exit(f"autopipec-hpc {' '.join(args)} failed (rc={res['rc']}):\n{res['stderr']}")
    res["peak_mib"] = res["maxrss_kib"] / 1024.0
    return res


def shards(out: Path) -> str:
    """'train shards x (largest y rows)' from the dataset.json that prepare wrote."""
    try:
        manifest = json.loads((out / "dataset.json").read_text())
        n_train, n_files = len(manifest["train_ids"]), len(manifest["train_files"])
    except (OSError, KeyError, ValueError):
        return ""
    return f"{n_train:,} train rows in {n_files} shard(s)"


def build_db(path: Path, structures) -> tuple[int, int, float]:
    """Write ``structures`` to extxyz and import them; (rows, atoms, seconds)."""
    import ase.io

    from autopipec_hpc.store import DatabaseManager

    t0 = time.perf_counter()
    xyz = path.with_suffix(".extxyz")
    for a in structures:
        a.info.pop("db_id", None)  # the database assigns ids
    ase.io.write(str(xyz), structures, format="extxyz")
    n = DatabaseManager(path).import_files([xyz])
    xyz.unlink()
    return n, sum(len(a) for a in structures), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=N, help="N (the large database has 10 N)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    n = args.n

    t_start = time.perf_counter()
    print(f"bench_prepare_memory: {machine_line()}")
    base = cu_structures()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_mem_"))
    try:
        banner("building databases (DatabaseManager.import_files, one transaction each)")
        one_atom = [a for a in base if len(a) == 1]
        biggest = max(base, key=len)
        dbs = {
            f"{n:,} Cu cells": (tmp / "n.db", rattled_copies(base, n, seed=1)),
            f"{10 * n:,} Cu cells": (tmp / "n10.db", rattled_copies(base, 10 * n, seed=2)),
            f"{n:,} x {len(biggest)}-atom cell": (tmp / "big.db", rattled_copies([biggest], n, seed=3)),
            f"{n:,} x 1-atom cells": (tmp / "one.db", rattled_copies(one_atom, n, seed=4)),
        }
        sizes = {}
        for name, (path, structures) in dbs.items():
            rows, atoms, secs = build_db(path, structures)
            sizes[name] = (rows, atoms)
            print(f"   {name:<24} {rows:>7,} rows {atoms:>9,} atoms  "
                  f"{path.stat().st_size / 2**20:7.1f} MiB on disk  built in {secs:5.1f} s")

        banner("peak RSS of `autopipec-hpc prepare`, one fresh process each")
        base_run = measure(["prepare", "--help"])
        print(f"   {'baseline (prepare --help: imports only)':<40} peak {base_run['peak_mib']:7.1f} MiB")
        runs = {}
        for name, (path, _) in dbs.items():
            out = tmp / f"out-{path.stem}"
            r = measure(["prepare", "--db", str(path), "--out", str(out)])
            runs[name] = r
            rows, atoms = sizes[name]
            print(f"   {name:<40} peak {r['peak_mib']:7.1f} MiB "
                  f"(+{r['peak_mib'] - base_run['peak_mib']:6.1f} over baseline)  "
                  f"wall {r['wall_s']:6.1f} s  {atoms / r['wall_s']:8,.0f} atoms/s  {shards(out)}")

        banner("results")
        small, large = runs[f"{n:,} Cu cells"], runs[f"{10 * n:,} Cu cells"]
        ratio = large["peak_mib"] / small["peak_mib"]
        inc_s = small["peak_mib"] - base_run["peak_mib"]
        inc_l = large["peak_mib"] - base_run["peak_mib"]
        ok = ratio <= TARGET
        print(f"N={n:,}: {small['peak_mib']:.1f} MiB, 10N={10 * n:,}: {large['peak_mib']:.1f} MiB; "
              f"wall {small['wall_s']:.1f} s vs {large['wall_s']:.1f} s")
        print(f"peak RSS ratio 10N / N = {ratio:.3f}x   target <= {TARGET}x: {verdict(ok)}")
        print(f"   above the import baseline: +{inc_s:.1f} MiB vs +{inc_l:.1f} MiB "
              f"({inc_l / inc_s if inc_s > 0 else float('nan'):.1f}x); "
              f"{(large['peak_mib'] - small['peak_mib']) * 1024 / (9 * n):.2f} KiB per extra structure")
        big = runs[f"{n:,} x {len(biggest)}-atom cell"]
        one = runs[f"{n:,} x 1-atom cells"]
        print(f"{n:,} x {len(biggest)}-atom: {big['peak_mib']:.1f} MiB vs {n:,} x 1-atom: "
              f"{one['peak_mib']:.1f} MiB  (ratio {big['peak_mib'] / one['peak_mib']:.2f}x for "
              f"{len(biggest)}x the atoms)")
        print(f"[total {time.perf_counter() - t_start:.0f} s]")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
