"""Labelling throughput with real DFT (GPAW): our label array vs GPAW called directly in a loop.

N rattled 4-atom fcc Al cells, PBE, plane waves 200 eV, Gamma point (the GPAW labeller of
`labeller-template --gpaw`), one thread per process. Timed in the same run, best of
--repeats each:

- direct: a user's script in a fresh interpreter, a loop with a fresh `gpaw.GPAW(**kwargs)` per
  cell, energy + forces (and, for information, the same loop in this already-warm process);
- 1 task: `label` on the local executor with all N cells in one array task (wall time from
  submission to the summary: process start, imports, claims, checks, writes included);
- 2 tasks: the same N cells as two array tasks side by side (2 cores).

Prints the overhead per structure (1 task / direct, target <= 1.1x at 10 structures) and the
scaling 1 task / 2 tasks. Needs `pip install -e .[dft]` (README: Installing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads: one thread per process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from ase.build import bulk  # noqa: E402

from autopipec_hpc.active.label_array import run_labels  # noqa: E402
from autopipec_hpc.active.label_folder import LabelFolder  # noqa: E402
from autopipec_hpc.active.labeller_config import LabellerConfig, labeller_template  # noqa: E402
from autopipec_hpc.config import SiteConfig  # noqa: E402
from autopipec_hpc.store import DatabaseManager  # noqa: E402


def cells(n: int, seed: int) -> list:
    out = []
    for k in range(n):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.rattle(0.05, seed=seed * 1000 + k)
        out.append(atoms)
    return out


def direct(labeller: LabellerConfig, structures: list) -> float:
    start = time.perf_counter()
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = labeller.make_calculator()
        atoms.get_potential_energy()
        atoms.get_forces()
    return time.perf_counter() - start


SCRIPT = """
import sys, ase.io, yaml
from autopipec_hpc.active.labeller_config import LabellerConfig, labeller_template
labeller = LabellerConfig.model_validate(yaml.safe_load(labeller_template(gpaw=True)))
for atoms in ase.io.read(sys.argv[1], ":"):
    atoms.calc = labeller.make_calculator()
    atoms.get_potential_energy()
    atoms.get_forces()
"""


def direct_script(structures: list, root: Path) -> float:
    """A user's script: a fresh interpreter that imports GPAW and labels the cells in a loop
    (interpreter start, imports and GPAW's first-call warm-up paid once, as a task pays them)."""
    import ase.io

    root.mkdir(parents=True, exist_ok=True)
    path = root / "cells.extxyz"
    ase.io.write(path, structures)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True)
    return time.perf_counter() - start


def through_label(labeller: LabellerConfig, structures: list, tasks: int, root: Path) -> tuple[float, float]:
    """Wall time from submission to the summary, and the slowest task's own time (claims,
    checks and writes included; its process start and imports not)."""
    root.mkdir(parents=True)
    site = SiteConfig(work_dir=root / "runs", output_dir=root / "out", database=str(root / "s.db"))
    db = DatabaseManager(site.database)
    ids = [db.add_candidate(a, "al") for a in structures]
    db.update_rows([(i, {"status": "DFT_REQUESTED"}) for i in ids])
    per = -(-len(ids) // tasks)
    start = time.perf_counter()
    summary = run_labels(site, db, labeller.model_copy(update={"structures_per_task": per}), timeout_s=3600,
                         )
    seconds = time.perf_counter() - start
    assert summary is not None and len(summary.labelled) == len(ids), summary
    folder = LabelFolder(summary.folder)
    in_tasks = max(folder.outcome(k).seconds for k in range(tasks))
    return seconds, in_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="structures (default 10)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    labeller = LabellerConfig.model_validate(yaml.safe_load(labeller_template(gpaw=True)))
    best = {"direct": float("inf"), "direct, warm": float("inf"), "1 task": float("inf"), "2 tasks": float("inf"),
            "inside 1 task": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            structures = cells(args.n, seed=r)
            best["direct"] = min(best["direct"], direct_script(structures, Path(tmp, f"direct-{r}")))
            best["direct, warm"] = min(best["direct, warm"], direct(labeller, structures))
            wall, inside = through_label(labeller, structures, 1, Path(tmp, f"one-{r}"))
            best["1 task"], best["inside 1 task"] = min(best["1 task"], wall), min(best["inside 1 task"], inside)
            best["2 tasks"] = min(best["2 tasks"], through_label(labeller, structures, 2, Path(tmp, f"two-{r}"))[0])
            print(f"repeat {r + 1}: best so far " + ", ".join(f"{k} {v:.1f} s" for k, v in best.items()),
                  flush=True)
    n = args.n
    print(f"\n{n} Al cells (4 atoms), GPAW PBE PW 200 eV Gamma, best of {args.repeats}, OMP_NUM_THREADS=1")
    for name, seconds in best.items():
        print(f"  {name:14s} {seconds:7.1f} s  {seconds / n:6.2f} s/structure  {n / seconds * 60:6.1f} structures/min")
    overhead = best["1 task"] / best["direct"]
    print(f"overhead of label (1 task, wall from submission to summary) vs GPAW directly: {overhead:.2f}x "
          f"({(best['1 task'] - best['direct']) / n:.2f} s per structure); target <= 1.1x at 10 structures: "
          f"{'MET' if overhead <= 1.1 else 'NOT MET'}")
    print(f"inside the task (claims, checks, writes, GPAW's warm-up; no process start) vs GPAW in a warm "
          f"process: {best['inside 1 task'] / best['direct, warm']:.2f}x")
    print(f"scaling 1 task -> 2 tasks on 2 cores: {best['1 task'] / best['2 tasks']:.2f}x")

if __name__ == "__main__":
    main()
