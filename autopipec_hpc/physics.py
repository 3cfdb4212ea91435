"""Physics baselines as ASE calculators: LAMMPS-exact ZBL and reference energies.

The deployed potential is V_ACE + V_ZBL + sum of per-element reference
energies. Each part is an ASE calculator so that the baseline, the fitted ACE
model and their sum plug into the same tools (``SumCalculator``, MD, EOS fits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols
from vesin import NeighborList

from autopipec_hpc.errors import ConfigError, StructureError

# LAMMPS metal units: qqr2e * qelectron^2 (eV * Angstrom), pair_zbl.h / update.cpp.
COULOMB_EV_ANGSTROM = 14.399645
# Universal screening length a0 and exponent (Ziegler, Biersack, Littmark 1985).
ZBL_A0 = 0.46850
ZBL_PZBL = 0.23
ZBL_C = np.array([0.02817, 0.28022, 0.50986, 0.18175])
ZBL_D = np.array([0.20162, 0.40290, 0.94229, 3.19980])
MAX_Z = 92
MIN_PAIR_DISTANCE = 1e-3


def describe_structure(atoms: Atoms) -> str:
    """A short name for error messages: the database id when known, else the formula."""
    db_id = atoms.info.get("db_id")
    formula = atoms.get_chemical_formula()
    return f"structure id={db_id} ({formula})" if db_id is not None else f"structure {formula}"


def _zbl_terms(
    r: np.ndarray, zz: np.ndarray | float, inv_a: np.ndarray | float, second: bool = False
) -> tuple[np.ndarray, ...]:
    """E(r), E'(r) (and E''(r) if asked) of the bare screened Coulomb term.

    ``zz`` and ``inv_a`` are per pair, or scalars when all pairs share one
    element pair (the common case, and the fast path).
    """
    phi = np.zeros_like(r)
    dphi = np.zeros_like(r)
    d2phi = np.zeros_like(r) if second else None
    for c, d in zip(ZBL_C, ZBL_D):
        rate = d * inv_a
        term = c * np.exp(-rate * r)
        phi += term
        dphi -= rate * term
        if second:
            d2phi += rate * rate * term
    inv_r = 1.0 / r
    prefactor = zz * inv_r
    energy = prefactor * phi
    first = prefactor * (dphi - phi * inv_r)
    if not second:
        return energy, first
    curvature = prefactor * (d2phi - 2.0 * dphi * inv_r + 2.0 * phi * inv_r * inv_r)
    return energy, first, curvature


class ZBLCalculator(Calculator):
    """LAMMPS ``pair_style zbl INNER OUTER`` as an ASE calculator.

    Reproduces LAMMPS exactly, including the lj/gromacs-style switch between
    ``inner`` and ``outer`` and its constant shift, which applies to every pair
    closer than ``outer``. Works for any mix of elements Z = 1..92 and for
    periodic, partly periodic and isolated structures.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, inner: float = 2.0, outer: float = 4.0, **kwargs) -> None:
        if not (np.isfinite(inner) and np.isfinite(outer)):
            raise ConfigError(f"ZBL cutoffs must be finite, got inner={inner}, outer={outer}")
        if inner <= 0:
            raise ConfigError(f"ZBL inner cutoff must be > 0 Angstrom, got inner={inner}")
        if inner >= outer:
            raise ConfigError(
                f"ZBL inner cutoff must be smaller than outer, got inner={inner} >= outer={outer}"
            )
        super().__init__(**kwargs)
        self.inner = float(inner)
        self.outer = float(outer)
        self._pair_cache: dict[tuple[int, int], tuple[float, float, float, float, float]] = {}
        self._neighbour_list = NeighborList(cutoff=self.outer, full_list=False)

    # -- per element pair constants, as LAMMPS's PairZBL::set_coeff ------------
    def _pair_constants(self, zi: int, zj: int) -> tuple[float, float, float, float, float]:
        key = (min(zi, zj), max(zi, zj))
        if key not in self._pair_cache:
            zz = COULOMB_EV_ANGSTROM * zi * zj
            inv_a = (zi**ZBL_PZBL + zj**ZBL_PZBL) / ZBL_A0
            rc = np.array([self.outer])
            fc, fcp, fcpp = (float(x[0]) for x in _zbl_terms(rc, zz, inv_a, second=True))
            tc = self.outer - self.inner
            swa = (-3.0 * fcp + tc * fcpp) / (tc * tc)
            swb = (2.0 * fcp - tc * fcpp) / (tc * tc * tc)
            swc = -fc + (tc / 2.0) * fcp - (tc * tc / 12.0) * fcpp
            self._pair_cache[key] = (zz, inv_a, swa, swb, swc)
        return self._pair_cache[key]

    def _per_pair_arrays(self, numbers: np.ndarray, i: np.ndarray, j: np.ndarray):
        """Constants for every listed pair, looked up through the unique element pairs."""
        species = np.unique(numbers)
        if len(species) == 1:
            return self._pair_constants(int(species[0]), int(species[0]))
        index_of = np.zeros(species.max() + 1, dtype=np.intp)
        index_of[species] = np.arange(len(species))
        table = np.array(
            [[self._pair_constants(int(a), int(b)) for b in species] for a in species]
        ).reshape(len(species), len(species), 5)
        si = index_of[numbers[i]]
        sj = index_of[numbers[j]]
        return table[si, sj].T  # five arrays of len(pairs)

    @staticmethod
    def check_elements(atoms: Atoms) -> None:
        bad = sorted({int(z) for z in atoms.numbers if z < 1 or z > MAX_Z})
        if bad:
            names = ", ".join(
                chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in bad
            )
            raise StructureError(
                f"{describe_structure(atoms)}: ZBL covers Z = 1..{MAX_Z}; found {names} (Z={bad})"
            )

    def pairs(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each unordered pair (i, j, |D|, D = r_j - r_i) within ``outer`` once, images included.

        The distance arrays are views valid until this calculator's next call.
        """
        cell = np.array(atoms.cell[:], dtype=float)
        periodic = np.asarray(atoms.pbc, dtype=bool)
        if periodic.all():
            if abs(np.linalg.det(cell)) < 1e-12:
                raise StructureError(f"{describe_structure(atoms)}: the periodic cell has zero volume")
        else:
            cell = self._box_for(atoms, cell, periodic)
        i, j, D, d = self._neighbour_list.compute(
            points=atoms.positions, box=cell, periodic=periodic, quantities="ijDd", copy=False
        )
        return i.astype(np.intp), j.astype(np.intp), d, D

    def _box_for(self, atoms: Atoms, cell: np.ndarray, periodic: np.ndarray) -> np.ndarray:
        """A full-rank box: the neighbour list needs one even where directions are open."""
        if periodic.any() and np.linalg.matrix_rank(cell[periodic]) < periodic.sum():
            raise StructureError(f"{describe_structure(atoms)}: the periodic cell vectors are degenerate")
        if np.linalg.matrix_rank(cell) == 3:
            return cell
        # Open directions without a cell vector get one long enough never to matter.
        extent = float(np.ptp(atoms.positions, axis=0).max()) + 2.0 * self.outer + 1.0
        for k in np.flatnonzero(~periodic):
            if np.linalg.norm(cell[k]) == 0.0:
                cell[k, k] = extent
        return cell if np.linalg.matrix_rank(cell) == 3 else np.diag(np.full(3, extent))

    def evaluate(
        self,
        atoms: Atoms,
        per_atom: bool = False,
        pairs: tuple[np.ndarray, ...] | None = None,
    ) -> tuple[float, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """Energy, per-atom energies (if asked), forces and (fully periodic only) stress.

        ``pairs`` is this calculator's own ``pairs(atoms)``, for callers that
        also need the distances.
        """
        self.check_elements(atoms)
        n = len(atoms)
        i, j, r, D = pairs if pairs is not None else self.pairs(atoms)
        close = r < MIN_PAIR_DISTANCE
        if close.any():
            k = int(np.argmax(close))
            raise StructureError(
                f"{describe_structure(atoms)}: atoms {int(i[k])} and {int(j[k])} are "
                f"{r[k]:.2e} Angstrom apart (< {MIN_PAIR_DISTANCE} Angstrom)"
            )
        periodic = bool(atoms.pbc.all())
        if len(r) == 0:
            return 0.0, np.zeros(n), np.zeros((n, 3)), np.zeros(6) if periodic else None
        # The switch adds t^3 (A/3 + B/4 t) beyond ``inner``, t = r - inner.
        zz, inv_a, swa, swb, swc = self._per_pair_arrays(atoms.numbers, i, j)
        e, de = _zbl_terms(r, zz, inv_a)
        e += swc
        t = np.maximum(r - self.inner, 0.0)
        t2 = t * t
        e += t2 * t * (swa / 3.0 + swb / 4.0 * t)
        de += t2 * (swa + swb * t)
        energies = None
        if per_atom:
            energies = 0.5 * (
                np.bincount(i, weights=e, minlength=n) + np.bincount(j, weights=e, minlength=n)
            )
        w = de / r
        fvec = w[:, None] * D  # force on i from j; j gets the opposite
        forces = np.empty((n, 3))
        for k in range(3):
            forces[:, k] = np.bincount(i, weights=fvec[:, k], minlength=n) - np.bincount(
                j, weights=fvec[:, k], minlength=n
            )
        stress = None
        if periodic:
            s = (D.T * w) @ D / atoms.get_volume()
            stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        return float(e.sum()), energies, forces, stress

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, energies, forces, stress = self.evaluate(self.atoms, per_atom=True)
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": energies,
            "forces": forces,
        }
        if stress is not None:
            self.results["stress"] = stress
        elif "stress" in properties:
            raise StructureError(
                f"{describe_structure(self.atoms)}: stress needs a fully periodic cell"
            )


class ReferenceEnergyCalculator(Calculator):
    """The constant per-element energies added back at deployment.

    Zero forces and stress; the energy is the sum of the reference energy of
    each atom's element.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, reference_energies: Mapping[str, float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference_energies = {k: float(v) for k, v in reference_energies.items()}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energies = per_atom_reference(self.atoms, self.reference_energies)
        n = len(self.atoms)
        self.results = {
            "energy": float(energies.sum()),
            "free_energy": float(energies.sum()),
            "energies": energies,
            "forces": np.zeros((n, 3)),
            "stress": np.zeros(6),
        }


def per_atom_reference(atoms: Atoms, reference_energies: Mapping[str, float]) -> np.ndarray:
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(reference_energies))
    if missing:
        raise StructureError(
            f"{describe_structure(atoms)}: no reference energy for element(s) {', '.join(missing)}"
        )
    return np.array([reference_energies[s] for s in symbols], dtype=float)


def fit_reference_energies(
    compositions: Iterable[Mapping[str, int]], energies: Iterable[float]
) -> dict[str, float]:
    """Per-element energies that best explain ``energies`` by least squares.

    ``energies`` are E_DFT - E_ZBL of the training structures. An element
    whose count never varies independently of the others is still given a
    value (the minimum-norm solution), which is what deployment needs.
    """
    comps = list(compositions)
    elements = sorted({el for c in comps for el in c})
    matrix = np.array([[c.get(el, 0) for el in elements] for c in comps], dtype=float)
    return fit_reference_energies_from_counts(matrix.reshape(len(comps), len(elements)), elements, energies)


def fit_reference_energies_from_counts(
    counts: np.ndarray, elements: list[str], energies: Iterable[float]
) -> dict[str, float]:
    """``fit_reference_energies`` on a (structures x elements) matrix of atom counts."""
    e = np.asarray(list(energies), dtype=float)
    if counts.shape[0] == 0 or not elements:
        raise ConfigError("cannot fit reference energies on an empty training set")
    solution, *_ = np.linalg.lstsq(counts, e, rcond=None)
    return {el: float(v) for el, v in zip(elements, solution)}
