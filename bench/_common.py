"""Helpers shared by the benchmarks in this folder (not part of the library).

The benchmarks run on shared, noisy machines, so every contender is timed
best-of-N in the same run and the figures that matter are the ratios.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CU_DATA = SHARED_DATA / "cu_fhiaims_105.extxyz"


def cu_structures():
    """The 105 FHI-aims Cu structures (1-96 atoms), with their DFT labels.

    Read in place from ``../shared/data`` (never copied into the project);
    exits with a clear message when the file is absent.
    """
    if not CU_DATA.is_file():
        sys.exit(
            f"benchmark data not found: {CU_DATA}\n"
            "This benchmark needs the shared DFT copper data (../shared/data/"
            "cu_fhiaims_105.extxyz relative to the project root)."
        )
    import ase.io

    return ase.io.read(str(CU_DATA), ":")


def rattled_copies(base, n: int, stdev: float = 0.02, seed: int = 0, first_id: int = 1):
    """``n`` structures cycling through ``base``, each with its own Gaussian
    rattle of ``stdev`` Angstrom, its base structure's DFT energy and forces in
    a SinglePointCalculator, a unique ``info['db_id']`` and the base's
    ``info['config_type']``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    labels = [(b.get_potential_energy(), b.get_forces()) for b in base]
    out = []
    for k in range(n):
        b = base[k % len(base)]
        energy, forces = labels[k % len(base)]
        a = Atoms(
            numbers=b.numbers,
            positions=b.positions + rng.normal(0.0, stdev, b.positions.shape),
            cell=b.cell,
            pbc=b.pbc,
        )
        a.calc = SinglePointCalculator(a, energy=energy, forces=forces.copy())
        a.info["db_id"] = first_id + k
        a.info["config_type"] = str(b.info.get("config_type", "default"))
        out.append(a)
    return out


def best_of(fn: Callable[[], object], repeats: int, setup: Callable[[int], object] | None = None) -> float:
    """Smallest wall time (s) of ``repeats`` calls of ``fn``.

    ``setup(k)``, if given, runs untimed before call ``k`` and its result is
    passed to ``fn`` (fresh inputs per repeat, so no cache can help).
    """
    best = float("inf")
    for k in range(repeats):
        arg = setup(k) if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        best = min(best, time.perf_counter() - t0)
    return best


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def banner(title: str) -> None:
    print()
    print("=" * 78)
    print(title)
    print("=" * 78)


def machine_line() -> str:
    cpus = os.cpu_count()
    try:
        load = ", load avg %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{cpus} CPU(s){load}, {platform.machine()} {platform.system()}"
    )


def fmt_rate(x: float) -> str:
    return f"{x:>12,.0f}"


def holdout_errors(folder: Path, holdout) -> tuple[float, float, float]:
    """The published potential in ``folder`` (the deployed ACE + ZBL + reference energies)
    on ``holdout`` [(atoms, energy, forces)]: energy RMSE (meV/atom), force RMSE and max
    force error (meV/A, per component)."""
    from autopipec_hpc.registry import load_calculator

    calc = load_calculator(folder)
    de, df = [], []
    for atoms, energy, forces in holdout:
        a = atoms.copy()
        a.calc = calc
        de.append((a.get_potential_energy() - energy) / len(a))
        df.append((a.get_forces() - forces).ravel())
    de_a, df_a = np.asarray(de), np.concatenate(df)
    return 1000 * float(np.sqrt(np.mean(de_a**2))), 1000 * float(np.sqrt(np.mean(df_a**2))), 1000 * float(np.abs(df_a).max())
