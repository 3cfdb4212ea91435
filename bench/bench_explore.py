"""Exploration MD throughput: one trajectory as an exploration task runs it vs a bare loop
of the same calculator evaluations.

Ours: ``active.explore.run_trajectory`` as an ``ExploreTask`` runs it (Langevin NVT with
the published generation's deployed calculator: ACE + ZBL + reference energies, its ACE
part carrying the active set; the sanity checks and the extrapolation grade of one frame
every ``--check-every`` steps, as ``select`` computes it). Bare: the deployed calculator
without the active set, energy and forces on the same cell, ``--steps`` times, on
frames rattled as at 600 K so that nothing is cached, no integrator, no checks. Both in
atom-steps per second of this process's CPU time (the machines are shared: wall time
swings with the neighbours' load, CPU time much less), best of ``--repeats``,
interleaved, in the same run; the target is our time at most 1.15x the bare loop's.

    .venv/bin/python bench/bench_explore.py [--potential output/potentials/1] [--steps 200] [--repeat 3]

Without ``--potential`` a tiny generation (16 functions, pyace, seconds to a couple of
minutes) is trained on the demo data in a temporary folder first. A small potential is
the hard case for the ratio: its evaluations are cheap, so our per-step work weighs more.
Prints the figures and MET / NOT MET; never fails on a missed target.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.build import bulk

from autopipec_hpc.active.explore import Trajectory, graded_calculator, run_trajectory
from autopipec_hpc.active.explore_plan import ExplorePlan
from autopipec_hpc.registry import load_calculator

TARGET_RATIO = 1.15


def tiny_potential(root: Path) -> Path:
    from autopipec_hpc.config import SiteConfig
    from autopipec_hpc.example_data import tiny_train_config, write_example_database
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.submission import train_generation

    site = SiteConfig(name="bench", scheduler="local", work_dir=root / "runs", output_dir=root / "output",
                      database=str(root / "structures.db"), pacemaker={"command": "pacemaker", "evaluator": "pyace"},
                      train={"cpus": 2})
    write_example_database(DatabaseManager(site.database))
    record = train_generation(site, tiny_train_config(), timeout_s=1800)
    return Path(record.potential_path)


def ours(potential: Path, cell, plan: ExplorePlan) -> float:
    calc, grade = graded_calculator(potential)  # what ExploreTask runs
    start = time.process_time()
    result, _ = run_trajectory(cell, calc, grade, plan, Trajectory(0, 0, "nvt", 600.0))
    elapsed = time.process_time() - start
    assert result.steps == plan.steps, f"the trajectory stopped early: {result.stop} {result.stop_detail}"
    return elapsed


def bare(potential: Path, cell, steps: int) -> float:
    calc = load_calculator(potential)
    atoms = cell.copy()
    atoms.calc = calc
    # Frames like a 600 K trajectory's (about 0.1 A from the lattice), each new: nothing cached.
    rng = np.random.default_rng(0)
    frames = cell.positions + rng.normal(0, 0.1, (steps, len(atoms), 3))
    start = time.process_time()
    for k in range(steps):
        atoms.positions = frames[k]
        atoms.get_forces()
        atoms.get_potential_energy()
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--potential", type=Path, default=None, help="a published potential folder (default: train one)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="cell repeats of the 4-atom cubic fcc cell")
    ap.add_argument("--repeats", type=int, default=3, help="timings per contender (best kept)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        potential = args.potential or tiny_potential(Path(tmp))
        cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(args.repeat)
        plan = ExplorePlan(ensembles=[{"ensemble": "nvt", "temperatures_K": [600]}], steps=args.steps,
                           check_every=args.check_every, gamma_lo=1e6, gamma_hi=1e7)
        ours(potential, cell, plan.model_copy(update={"steps": args.check_every}))  # warm-up: imports, first calls
        bare(potential, cell, 2)
        # Interleaved, so that a neighbour's load on the shared machine falls on both alike.
        pairs = [(ours(potential, cell, plan), bare(potential, cell, args.steps)) for _ in range(args.repeats)]
        t_ours, t_bare = min(p[0] for p in pairs), min(p[1] for p in pairs)
    atom_steps = len(cell) * args.steps
    ratio = t_ours / t_bare
    print(f"potential {potential}; {len(cell)} atoms, {args.steps} steps, gamma every {args.check_every} steps, "
          f"best of {args.repeats}")
    print(f"exploration task (Langevin + checks + gamma): {atom_steps / t_ours:,.0f} atom-steps/s ({t_ours:.2f} s)")
    print(f"bare loop of the same calculator:            {atom_steps / t_bare:,.0f} atom-steps/s ({t_bare:.2f} s)")
    print(f"overhead ratio {ratio:.3f}x (target <= {TARGET_RATIO}x): {'MET' if ratio <= TARGET_RATIO else 'NOT MET'}")


if __name__ == "__main__":
    main()
