"""The exploring loop vs the pool loop on EMT copper: accurate share, holdout errors and labels
per generation.

Generation 1 is trained once on the 33 example cells (example_data.py). Then two arms run
the real loop (``run_loop``, EMT labels, ``--select`` per generation, warm starts) up to
``--generations`` generations:

- explore: ``loop --plan`` with the plan ``plan-template`` prints and ``--converge``: each
  published generation explores with MD, selects among what it found;
- pool: the pool loop on a hand-made candidate pool (``example_data.candidate_pool``: the
  demo loop's kinds and shares) of as many candidates as the explore arm harvested in all.

The holdout is what an exploring potential meets: frames of EMT molecular dynamics (NVT at
300, 900 and 1500 K, NPT at 600 K and 10 GPa on 32-atom cells), labelled with EMT. Errors
are of the deployed model (ACE + ZBL + reference energies).

    .venv/bin/python bench/bench_explore_loop.py [--generations 4] [--select 10] [--converge 0.99] [--keep]

Fits are the demo's (100 functions on tensorpot, a tiny basis on pyace) without early
stopping. About 20-30 minutes on 2 cores. Prints the tables; never fails.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import sys
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT

from autopipec_hpc.active.loop import LoopSettings, run_loop
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.demo import demo_plan
from autopipec_hpc.example_data import candidate_pool, demo_train_config, write_example_database
from autopipec_hpc.preflight import local_evaluator
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.submission import train_generation
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import holdout_errors  # noqa: E402

START_ROWS = 33


def md_holdout(seed: int, per_point: int = 10):
    """(atoms, energy, forces) of EMT MD frames: what an exploring potential meets."""
    from ase.md.langevin import Langevin
    from ase.md.nptberendsen import NPTBerendsen
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    out = []
    for temperature, pressure in ((300, None), (900, None), (1500, None), (600, 10.0)):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        if pressure is None:
            dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, fixcm=False,
                           rng=rng)
        else:
            dyn = NPTBerendsen(atoms, 2 * units.fs, temperature_K=temperature, pressure_au=pressure * units.GPa,
                               taut=100 * units.fs, taup=1000 * units.fs, compressibility_au=0.01 / units.GPa)
        dyn.run(100)
        for _ in range(per_point):
            dyn.run(20)
            frame = atoms.copy()
            out.append((frame, float(atoms.get_potential_energy()), atoms.get_forces().copy()))
    return out


def site_for(root: Path) -> SiteConfig:
    return SiteConfig(name="bench-explore", scheduler="local", work_dir=root / "runs", output_dir=root / "output",
                      database=str(root / "structures.db"), pacemaker={"command": "pacemaker", "evaluator": "auto"},
                      train={"cpus": 2})


def arm(root: Path, base: Path, name: str) -> tuple[SiteConfig, DatabaseManager]:
    site = site_for(root / name)
    site.output_dir.mkdir(parents=True)
    shutil.copy(base / "structures.db", site.database)
    return site, DatabaseManager(site.database)


def table(name: str, db: DatabaseManager, holdout, shares: dict[int, float]) -> None:
    print(f"\n{name}: generation, labels used so far, holdout E RMSE meV/atom, F RMSE meV/A, accurate share")
    for record in db.records():
        if record.potential_path is None:
            print(f"  {record.generation}  {record.status}: {record.reason}")
            continue
        e, f = holdout_errors(Path(record.potential_path), holdout)[:2]
        used = sum(1 for r in db.iter_rows(status=StructureStatus.TRAINING_READY)
                   if r.get("selected_by_generation") is not None and int(r.selected_by_generation) < record.generation)
        share = f"{shares[record.generation]:.3f}" if record.generation in shares else "-"
        print(f"  {record.generation}  {used:4d}  {e:8.2f}  {f:8.1f}  {share}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--select", type=int, default=10)
    parser.add_argument("--converge", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-explore-loop-"))
    base_site = site_for(root / "base")
    base_site.output_dir.mkdir(parents=True)
    write_example_database(DatabaseManager(base_site.database))
    # Without early stopping: both arms fit the same iterations, and a warm-started tensorpot
    # fit whose test loss stops moving altogether raised pacemaker's
    # TestLossChangeTooSmallException out of the fit (exit 1) in the first run of this script.
    config = demo_train_config(local_evaluator(base_site).evaluator).model_copy(
        update={"early_stopping_min_improvement": None, "seed": args.seed})
    train_generation(base_site, config, generation=1, timeout_s=3600)
    holdout = md_holdout(args.seed)
    print(f"generation 1 trained on {START_ROWS} example cells ({time.monotonic() - t0:.0f} s); holdout: "
          f"{len(holdout)} EMT MD frames; {config.b_basis_size} functions, {config.maxiter} iterations")

    site, db = arm(root, root / "base", "explore")
    settings = LoopSettings(generations=args.generations, select=args.select, calculator="ase.calculators.emt:EMT",
                            plan=demo_plan(), converge=args.converge)
    steps = run_loop(site, db, config, settings, timeout_s=3600, notify=lambda m: print(m, flush=True)
                     if m.startswith("loop:") else None)
    markers = db.markers("exploration")
    shares = {int(m.generation): float(m.accurate_share) for m in markers}
    harvested = sum(int(m.n_imported) for m in markers)
    print(f"explore arm: {len(steps)} steps (its stop is the last loop line above); {harvested} candidates "
          f"harvested; {time.monotonic() - t0:.0f} s")

    pool_site, pool_db = arm(root, root / "base", "pool")
    pool = candidate_pool(max(harvested, args.select), seed=args.seed)
    for atoms, kind in pool:
        pool_db.add_candidate(atoms, kind)
    settings = LoopSettings(generations=max(r.generation for r in db.records()), select=args.select,
                            calculator="ase.calculators.emt:EMT")
    run_loop(pool_site, pool_db, config, settings, timeout_s=3600, notify=lambda m: None)

    table("explore arm", db, holdout, shares)
    table(f"pool arm ({len(pool)} candidates)", pool_db, holdout, {})
    print(f"\n{time.monotonic() - t0:.0f} s in all; folders in {root}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
