"""`autopipec-hpc select` vs pacemaker's `pace_select`: throughput, and peak memory as candidates grow.

Run from the project root (a few minutes on 2 cores):

    .venv/bin/python bench/bench_select.py [--n 700] [--scale 10] [--repeats 3] [--maxiter 10] [--keep DIR]

A real potential at production size: the 105 FHI-aims Cu cells of ../shared
imported with ``autopipec-hpc import`` and trained with ``autopipec-hpc submit
--wait`` on a local site (100 functions per element, max_degree 4, ``--maxiter``
iterations on tensorpot), which publishes generation 1 with its active set
``potential.asi`` (pacemaker's ``pace_activeset``). The candidates: the 105
cells cycled to N, each with its own Gaussian rattle of 0.05 A, imported as
CANDIDATE rows (``import --status CANDIDATE``); the same structures go into a
pandas pickle for ``pace_select``.

Timed, each in a fresh process, the contenders alternating, best of R (our package
byte-compiled first, as ``pip install`` leaves it):

- ours: ``autopipec-hpc select --db COPY --generation 1 --max M`` (the command
  as a user runs it: D-optimal, gamma_min 1, every candidate scored and its gamma
  written, MaxVol, the summary and its figure, the commit), each repeat on a
  fresh copy of the database;
- pace_select: ``pace_select -p potential.yaml -a potential.asi cands.pckl.gzip
  -m M`` on the same potential, active set and structures.

Target: ours at least pace_select's throughput (time ratio ours / pace_select <= 1).

Memory: peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper process
whose only child is the command) of our select at N and at ``--scale`` x N
candidates; target: at most 1.2x (ours streams the candidates in batches).
pace_select's peak at both sizes is shown for scale (it loads every candidate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, rattled_copies, verdict  # noqa: E402

import yaml  # noqa: E402

TIME_TARGET = 1.0  # ours / pace_select, wall time
MEMORY_TARGET = 1.2  # ours at scale x N / ours at N, peak RSS
BIN = Path(sys.executable).parent
CLI = BIN / "autopipec-hpc"
PACE_SELECT = BIN / "pace_select"

# Runs the command in argv as its only child; prints that child's wall time and peak RSS.
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kib": ru.ru_maxrss,
                  "out": p.stdout[-3000:], "err": p.stderr[-3000:]}))
"""


def measure(argv: list[str], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=cwd, capture_output=True, text=True)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        sys.exit(f"{' '.join(argv)} failed ({res['rc']}):\n{res['out']}\n{res['err']}")
    res["peak_mib"] = res["maxrss_kib"] / 1024.0
    return res


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def train(root: Path, maxiter: int) -> Path:
    """Generation 1 at production size, published by our own submit --wait; its folder."""
    import ase.io

    from autopipec_hpc.config import SiteConfig, TrainConfig
    from autopipec_hpc.store import DatabaseManager

    db = root / "base.db"
    ase.io.write(root / "cu.extxyz", cu_structures())
    run([str(CLI), "import", str(root / "cu.extxyz"), "--db", str(db)], root)
    site = SiteConfig(name="bench-select", scheduler="local", work_dir=root / "runs", output_dir=root / "output",
                      database=str(db), pacemaker={"command": "pacemaker", "evaluator": "tensorpot"},
                      train={"cpus": 2})
    (root / "site.yaml").write_text(yaml.safe_dump(site.model_dump(mode="json")))
    config = TrainConfig(b_basis_size=100, max_degree=4, maxiter=maxiter, test_fraction=0.1)
    (root / "train.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run([str(CLI), "submit", "--wait", "--site", str(root / "site.yaml"), "--config", str(root / "train.yaml")], root)
    record = DatabaseManager(str(db)).get_record(1)
    return Path(record.potential_path)


def candidates_db(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """A copy of the trained database with n CANDIDATE rows, and the same structures as a pickle."""
    import ase.io
    import pandas as pd

    frames = rattled_copies(cu_structures(), n, stdev=0.05, seed=seed)
    for a in frames:
        a.calc = None  # unlabelled candidates
    xyz = root / f"cands-{n}.extxyz"
    ase.io.write(xyz, frames)
    db = root / f"cands-{n}.db"
    shutil.copy(root / "base.db", db)
    run([str(CLI), "import", str(xyz), "--db", str(db), "--status", "CANDIDATE"], root)
    pickle = root / f"cands-{n}.pckl.gzip"
    pd.DataFrame({"ase_atoms": frames}).to_pickle(pickle, compression="gzip", protocol=4)
    xyz.unlink()
    return db, pickle


def ours(root: Path, db: Path, max_select: int, k: int) -> dict:
    copy = root / f"run-{k}.db"
    shutil.copy(db, copy)
    out = root / f"sel-{k}"
    res = measure([str(CLI), "select", "--db", str(copy), "--generation", "1", "--max", str(max_select),
                   "--out", str(out)], root)
    summary = json.loads((out / "selection.json").read_text())
    res["scored"], res["selected"] = summary["scored"], len(summary["selected_ids"])
    copy.unlink()
    shutil.rmtree(out, ignore_errors=True)
    return res


def theirs(root: Path, potential: Path, pickle: Path, max_select: int, k: int) -> dict:
    out = root / f"pace-{k}.pkl.gz"
    res = measure([str(PACE_SELECT), "-p", str(potential / "potential.yaml"), "-a", str(potential / "potential.asi"),
                   str(pickle), "-m", str(max_select), "-o", str(out)], root)
    import pandas as pd

    res["selected"] = len(pd.read_pickle(out, compression="gzip"))
    out.unlink()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=700, help="candidates for the timing (default 700)")
    parser.add_argument("--scale", type=int, default=10, help="memory at N and at scale x N (default 10; 0 skips)")
    parser.add_argument("--repeats", type=int, default=3, help="best of R per contender (default 3)")
    parser.add_argument("--max", type=int, default=20, help="structures to select (default 20, select's default)")
    parser.add_argument("--maxiter", type=int, default=10, help="iterations of the potential's fit (default 10)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this folder and keep it; a trained potential found there is reused")
    args = parser.parse_args()
    if not PACE_SELECT.exists():
        sys.exit(f"pace_select not found at {PACE_SELECT}: install python-ace into this venv")

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-select-"))
    root.mkdir(parents=True, exist_ok=True)
    banner("select: autopipec-hpc select vs pace_select (same potential, active set, candidates)")
    print(machine_line())
    marker = root / "potential.txt"
    if marker.exists():
        potential = Path(marker.read_text().strip())
        print(f"reusing the potential in {potential}")
    else:
        print(f"training generation 1: 105 DFT Cu cells, 100 functions, maxiter {args.maxiter}, tensorpot ...",
              flush=True)
        potential = train(root, args.maxiter)
        marker.write_text(str(potential))

    # pip compiles an installed package's modules; an editable install under
    # PYTHONDONTWRITEBYTECODE (this machine's default) would compile ours anew in every run.
    import compileall

    import autopipec_hpc

    compileall.compile_dir(str(Path(autopipec_hpc.__file__).parent), quiet=1)
    db, pickle = candidates_db(root, args.n, seed=1)
    print(f"candidates: {args.n} rattled (0.05 A) copies of the 105 cells; best of {args.repeats}, "
          f"contenders alternate; --max {args.max}", flush=True)
    mine, pace = [], []
    for k in range(args.repeats):
        order = ("ours", "pace") if k % 2 == 0 else ("pace", "ours")
        for who in order:
            if who == "ours":
                mine.append(ours(root, db, args.max, k))
                r = mine[-1]
                print(f"  ours        #{k + 1}: {r['wall_s']:7.2f} s, peak {r['peak_mib']:7.1f} MiB "
                      f"({r['scored']} scored, {r['selected']} selected)", flush=True)
            else:
                pace.append(theirs(root, potential, pickle, args.max, k))
                r = pace[-1]
                print(f"  pace_select #{k + 1}: {r['wall_s']:7.2f} s, peak {r['peak_mib']:7.1f} MiB "
                      f"({r['selected']} selected)", flush=True)
    best_ours, best_pace = min(r["wall_s"] for r in mine), min(r["wall_s"] for r in pace)
    ratio = best_ours / best_pace
    print()
    print(f"  best ours {best_ours:.2f} s ({args.n / best_ours:.0f} candidates/s), best pace_select "
          f"{best_pace:.2f} s ({args.n / best_pace:.0f} candidates/s)")
    print(f"  time ratio ours / pace_select = {ratio:.2f} (throughput {1 / ratio:.2f}x pace_select's)   "
          f"target <= {TIME_TARGET:.2f}: {verdict(ratio <= TIME_TARGET)}")

    if args.scale > 0:
        big = args.n * args.scale
        banner(f"peak memory: our select at N = {args.n} and at {args.scale} x N = {big}")
        big_db, big_pickle = candidates_db(root, big, seed=2)
        small_peak = min(r["peak_mib"] for r in mine)
        large = ours(root, big_db, args.max, 99)
        large_pace = theirs(root, potential, big_pickle, args.max, 99)
        mem_ratio = large["peak_mib"] / small_peak
        print(f"  ours        N={args.n:>7,}: peak {small_peak:7.1f} MiB")
        print(f"  ours        N={big:>7,}: peak {large['peak_mib']:7.1f} MiB, {large['wall_s']:.1f} s "
              f"({big / large['wall_s']:.0f} candidates/s)")
        print(f"  pace_select N={args.n:>7,}: peak {min(r['peak_mib'] for r in pace):7.1f} MiB")
        print(f"  pace_select N={big:>7,}: peak {large_pace['peak_mib']:7.1f} MiB, {large_pace['wall_s']:.1f} s")
        print(f"  memory ratio ours {args.scale}x N / N = {mem_ratio:.2f}   target <= {MEMORY_TARGET:.2f}: "
              f"{verdict(mem_ratio <= MEMORY_TARGET)}")
        big_db.unlink()
        big_pickle.unlink()

    if args.keep:
        print(f"\nkept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
