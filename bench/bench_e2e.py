"""End-to-end overhead: `autopipec-hpc submit --wait` vs running pacemaker directly.

Run from the project root:

    .venv/bin/python bench/bench_e2e.py                  # production size, best of 1: ~12 min on 2 cores
    .venv/bin/python bench/bench_e2e.py --size tiny --maxiter 100 --repeats 2

Production size (the default): 1,000 structures (the 105 DFT Cu cells of
../shared cycled, each rattled), 100 functions per element, max_degree 4,
200 iterations, pacemaker's TensorFlow evaluator (tensorpot). Tiny: the 30
EMT Cu cells, 16 functions, pyace.

Ours: the command line, `autopipec-hpc submit --wait` in a fresh process with
a local site: dataset preparation, preflight, the training job (backend probe,
pacemaker), the evaluation job (holdout predictions, ``pace_yaml2yace``,
``pace_activeset``, parity plot, learning curve) and publication. Every repeat
uses a fresh temporary root (new database, run folder and output folder).

Direct: the exact ``input.yaml`` our training job ran (absolute paths to the
same prepared dataset files), copied into an empty folder and run with
``pacemaker input.yaml`` from this venv, output to /dev/null.

The two contenders alternate (ours, direct, direct, ours, ...) and each is
timed best-of-R. Target: best ours / best direct <= 1.10 at the default
maxiter, where pacemaker's own time dominates as in real use. The demo's
maxiter=20 (one repeat) is shown for information: it is where our fixed
overhead weighs most. Our overhead is broken down from the timestamps in the
run folder (file mtimes, submitit logs) and a separate timing of the preflight.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, machine_line, verdict  # noqa: E402

import yaml  # noqa: E402

from autopipec_hpc.config import SiteConfig, TrainConfig  # noqa: E402
from autopipec_hpc.store import DatabaseManager  # noqa: E402
from autopipec_hpc.example_data import tiny_train_config, write_example_database  # noqa: E402
from autopipec_hpc.pacemaker.files import read_metrics_table  # noqa: E402

TARGET = 1.05  # ours / direct, wall time
DEFAULT_MAXITER = 200
DEMO_MAXITER = 20
PACEMAKER = Path(sys.executable).parent / "pacemaker"
SUBMITIT_STAMP = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - (.*)")


@dataclass
class OursRun:
    maxiter: int
    wall_s: float
    pacemaker_s: float  # pacemaker's wall time inside the training job
    run_dir: Path
    final_loss: float | None
    phases: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class DirectRun:
    maxiter: int
    wall_s: float
    final_loss: float | None


def final_loss(folder: Path) -> float | None:
    table = read_metrics_table(folder / "metrics.txt")
    return None if table is None else float(table["loss"].iloc[-1])


def submitit_stamp(log: Path, message: str) -> float | None:
    """Epoch time of the first line of a submitit log that starts with ``message``."""
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        m = SUBMITIT_STAMP.search(line)
        if m and m[2].startswith(message):
            return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def breakdown(run_dir: Path, potential_dir: Path, t0: float, t_submitted: float, t_end: float,
              pacemaker_s: float) -> list[tuple[str, float]]:
    """Phases of one of our runs, from the run folder's timestamps (epoch seconds)."""
    jobs = json.loads((run_dir / "jobs.json").read_text())
    sub = run_dir / "submitit"
    attempt = run_dir / "attempt-1"
    pm_start = mtime(attempt / "input.yaml")  # written just before pacemaker is launched
    marks = [
        ("start (in-process call)", t0),
        ("dataset + run folder + record (prepare_run)", mtime(run_dir / "run.json")),
        ("preflight + submitit submit of 2 jobs", mtime(run_dir / "jobs.json")),
        ("  (submit_generation returned)", t_submitted),
        ("training job start-up (python + submitit)", submitit_stamp(sub / f"{jobs['train']['job_id']}_0_log.out", "Starting")),
        ("job body up to pacemaker launch (imports, backend probe, record, input.yaml)", pm_start),
        ("PACEMAKER inside the training job", None if pm_start is None else pm_start + pacemaker_s),
        ("read pacemaker's results, train.done", mtime(run_dir / "train.done")),
        ("eval: afterok poll (1 s) + pyace import + pace_yaml2yace", mtime(potential_dir / "potential.yace")),
        ("eval: pace_activeset", mtime(potential_dir / "potential.asi")),
        ("eval: holdout predictions (PyACE + ZBL) + metrics", mtime(potential_dir / "metrics.json")),
        ("eval: parity plot", mtime(potential_dir / "parity.png")),
        ("eval: learning curve", mtime(potential_dir / "learning_curve.png")),
        ("eval: copies, publish, DB record, job exit",
         submitit_stamp(sub / f"{jobs['evaluate']['job_id']}_0_log.out", "Job completed")),
        ("wait poll latency (1 s) + CLI process exit", t_end),
    ]
    phases, previous = [], t0
    for name, stamp in marks[1:]:
        if name.startswith("  ("):
            continue
        if stamp is None:
            phases.append((name + " [timestamp missing]", float("nan")))
            continue
        phases.append((name, stamp - previous))
        previous = stamp
    return phases


def make_database(db: str, size: str) -> None:
    if size == "tiny":
        write_example_database(DatabaseManager(db))
        return
    import ase.io

    from _common import cu_structures, rattled_copies

    data = Path(db).with_suffix(".extxyz")
    ase.io.write(data, rattled_copies(cu_structures(), 1000, stdev=0.02))
    DatabaseManager(db).import_files([data])


def train_config(size: str, maxiter: int):
    if size == "tiny":
        return tiny_train_config().model_copy(update={"maxiter": maxiter})
    return TrainConfig(b_basis_size=100, max_degree=4, maxiter=maxiter, energy_weight=1.0, force_weight=1.0)


def run_ours(maxiter: int, size: str = "production") -> OursRun:
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-ours-"))
    db = str(root / "s.db")
    make_database(db, size)
    site = SiteConfig(
        name="bench", scheduler="local", work_dir=root / "runs", output_dir=root / "output", database=db,
        pacemaker={"command": "pacemaker", "evaluator": "pyace" if size == "tiny" else "tensorpot"},
        train={"cpus": 2},
    )
    (root / "site.yaml").write_text(yaml.safe_dump(site.model_dump(mode="json")))
    (root / "train.yaml").write_text(yaml.safe_dump(train_config(size, maxiter).model_dump(mode="json")))
    cli = Path(sys.executable).parent / "autopipec-hpc"
    t0_epoch = time.time()
    t0 = time.perf_counter()
    done = subprocess.run([str(cli), "submit", "--wait", "--site", str(root / "site.yaml"),
                           "--config", str(root / "train.yaml")], cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"autopipec-hpc submit --wait failed ({done.returncode}): {done.stderr[-2000:]}")
    record = DatabaseManager(db).get_record(1)
    run_dir = Path(record.values["run_dir"])
    t_submitted = mtime(run_dir / "jobs.json") or t0_epoch
    t_end = t0_epoch + wall
    pacemaker_s = float(record.values["wall_time_s"])
    phases = breakdown(run_dir, Path(record.values["potential_path"]), t0_epoch, t_submitted, t_end, pacemaker_s)
    return OursRun(maxiter, wall, pacemaker_s, run_dir, final_loss(run_dir / "attempt-1"), phases)


def run_direct(input_yaml: Path, maxiter: int) -> DirectRun:
    folder = Path(tempfile.mkdtemp(prefix="bench-e2e-direct-"))
    shutil.copy(input_yaml, folder / "input.yaml")
    t0 = time.perf_counter()
    done = subprocess.run([str(PACEMAKER), "input.yaml"], cwd=folder,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if done.returncode != 0 or not (folder / "output_potential.yaml").exists():
        sys.exit(f"direct pacemaker failed (exit {done.returncode}); its folder is kept: {folder}")
    loss = final_loss(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return DirectRun(maxiter, wall, loss)


def print_ours(k: int, run: OursRun) -> None:
    print(f"  ours   #{k}: {run.wall_s:8.2f} s end to end (pacemaker in the job {run.pacemaker_s:.2f} s, "
          f"ours / that {run.wall_s / run.pacemaker_s:.3f}), final loss {run.final_loss:.6e}", flush=True)


def print_direct(k: int, run: DirectRun) -> None:
    print(f"  direct #{k}: {run.wall_s:8.2f} s, final loss {run.final_loss:.6e}", flush=True)


def print_breakdown(run: OursRun) -> None:
    overhead = run.wall_s - run.pacemaker_s
    print("  phase                                                            seconds")
    for name, seconds in run.phases:
        mark = "" if name.startswith("PACEMAKER") else f"  {100 * seconds / overhead:4.0f}% of overhead"
        print(f"  {name:<64} {seconds:7.2f}{mark}")
    print(f"  {'total (end to end)':<64} {sum(s for _, s in run.phases):7.2f}  (measured {run.wall_s:.2f})")
    print(f"  {'overhead around pacemaker (end to end - pacemaker in job)':<64} {overhead:7.2f}")


def profile_preflight(run: OursRun) -> None:
    """Time the preflight checks on their own (same spec and dataset as a finished run)."""
    from autopipec_hpc import preflight
    from autopipec_hpc.dataset_prep import DatasetManifest
    from autopipec_hpc.run_folder import RunSpec

    spec = RunSpec.load(run.run_dir)
    manifest = DatasetManifest.load(spec.dataset_dir)
    t = time.perf_counter()
    interpreter, _ = preflight.check_pacemaker(spec)
    t_pm = time.perf_counter() - t
    t = time.perf_counter()
    preflight.check_dataset_readable(spec, manifest, interpreter)
    t_ds = time.perf_counter() - t
    t = time.perf_counter()
    preflight.check_database(spec)
    t_db = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    t_py = time.perf_counter() - t
    print("  preflight, timed on its own (each check is a `bash -c` subprocess):")
    print(f"    'pacemaker command' (import pyace; versions probe)       {t_pm:6.2f} s")
    print(f"    'dataset readable' (python + pandas, read the pickles)   {t_ds:6.2f} s")
    print(f"    'database reachable' (python + ase.db + autopipec_hpc)   {t_db:6.2f} s")
    print(f"    total                                                    {t_pm + t_ds + t_db:6.2f} s")
    print(f"    (for scale: a bare `python -c pass`                      {t_py:6.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maxiter", type=int, default=DEFAULT_MAXITER,
                        help=f"pacemaker iterations for the target comparison (default {DEFAULT_MAXITER})")
    parser.add_argument("--repeats", type=int, default=1, help="repeats per contender, best is kept (default 1)")
    parser.add_argument("--size", choices=("production", "tiny"), default="production")
    parser.add_argument("--demo-maxiter", type=int, default=0,
                        help=f"maxiter of the one-repeat small-fit comparison (default {DEMO_MAXITER}; 0 skips it)")
    parser.add_argument("--keep", action="store_true", help="keep our temporary run roots")
    args = parser.parse_args()
    if not PACEMAKER.exists():
        sys.exit(f"pacemaker not found at {PACEMAKER}: install python-ace into this venv")

    banner(f"End-to-end overhead: ours (local scheduler) vs pacemaker directly, maxiter={args.maxiter}")
    print(machine_line())
    if args.size == "tiny":
        print(f"data: 30 EMT Cu structures, tiny_train_config() with maxiter={args.maxiter}, "
              f"pyace evaluator; best of {args.repeats}, contenders alternate")
    else:
        print(f"data: 1,000 rattled DFT Cu structures, 100 functions per element, max_degree 4, "
              f"maxiter={args.maxiter}, tensorpot evaluator, 2 threads; best of {args.repeats}, contenders alternate")
    ours: list[OursRun] = []
    direct: list[DirectRun] = []
    for k in range(1, args.repeats + 1):
        order = ("ours", "direct") if k % 2 == 1 else ("direct", "ours")
        for who in order:
            if who == "ours":
                ours.append(run_ours(args.maxiter, args.size))
                print_ours(k, ours[-1])
            else:
                direct.append(run_direct(ours[-1].run_dir / "attempt-1" / "input.yaml", args.maxiter))
                print_direct(k, direct[-1])

    best_ours = min(ours, key=lambda r: r.wall_s)
    best_direct = min(r.wall_s for r in direct)
    ratio = best_ours.wall_s / best_direct
    same = {round(r.final_loss, 12) for r in ours} | {round(r.final_loss, 12) for r in direct}
    print()
    print(f"  direct pacemaker, best of {args.repeats}:        {best_direct:8.2f} s")
    print(f"  ours end to end, best of {args.repeats}:         {best_ours.wall_s:8.2f} s")
    print(f"  absolute overhead (best - best):     {best_ours.wall_s - best_direct:8.2f} s")
    print(f"  overhead within the best ours run:   {best_ours.wall_s - best_ours.pacemaker_s:8.2f} s "
          f"(end to end - pacemaker's wall time inside its job)")
    print(f"  same fit in every run (final loss):  {'yes' if len(same) == 1 else 'NO: ' + str(sorted(same))}")
    print(f"  ratio ours / direct = {ratio:.3f}   target <= {TARGET:.2f}: {verdict(ratio <= TARGET)}")

    banner(f"Where our overhead goes (best ours run, maxiter={args.maxiter})")
    print_breakdown(best_ours)
    print()
    profile_preflight(best_ours)

    if args.demo_maxiter > 0:
        banner(f"For information, NOT the target: demo-size fit, maxiter={args.demo_maxiter}, one repeat each")
        small = run_ours(args.demo_maxiter, "tiny")
        print_ours(1, small)
        small_direct = run_direct(small.run_dir / "attempt-1" / "input.yaml", args.demo_maxiter)
        print_direct(1, small_direct)
        print(f"  ratio ours / direct at maxiter={args.demo_maxiter}: {small.wall_s / small_direct.wall_s:.3f} "
              f"(overhead {small.wall_s - small_direct.wall_s:.2f} s; within the ours run "
              f"{small.wall_s - small.pacemaker_s:.2f} s)")
        ours.append(small)

    roots = {r.run_dir.parents[1] for r in ours}
    if args.keep:
        print("\nkept: " + " ".join(str(r) for r in sorted(roots)))
    else:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
