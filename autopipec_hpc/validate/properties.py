"""Static properties of a calculator: equation of state, cubic elastic constants, dimer
curves, vacancy formation energy. Each takes an ASE calculator and structures, nothing
of the pipeline, so any calculator (EMT in the tests, the deployed ACE + ZBL in the
validation job) is judged by the same code.

Units: energies eV, lengths Angstrom, B0 and elastic constants GPa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.data import covalent_radii

from autopipec_hpc.errors import PropertyError


@dataclass(frozen=True)
class EOSFit:
    """Birch-Murnaghan fit: energies a cubic polynomial in V^(-2/3) (the linear form of the
    third-order Birch-Murnaghan equation), per atom."""

    v0: float  # Angstrom^3/atom
    e0: float  # eV/atom
    b0_gpa: float

    @classmethod
    def fit(cls, volumes: np.ndarray, energies: np.ndarray) -> "EOSFit":
        x = np.asarray(volumes, float) ** (-2.0 / 3.0)
        e = np.asarray(energies, float)
        if len(x) < 4 or not np.all(np.isfinite(e)):
            raise PropertyError("EOS: fewer than 4 points or non-finite energies")
        poly = np.polyfit(x, e, 3)
        stationary = [r.real for r in np.roots(np.polyder(poly)) if abs(r.imag) < 1e-12 and r.real > 0]
        minima = [r for r in stationary if np.polyval(np.polyder(poly, 2), r) > 0]
        if not minima:
            raise PropertyError("EOS: the energy has no minimum in volume")
        x0 = min(minima, key=lambda r: abs(r - x.mean()))
        v0 = x0 ** -1.5
        # B = V d2E/dV2; with x = V^(-2/3): dx/dV = -2/3 x/V, d2x/dV2 = 10/9 x/V^2
        d1, d2 = np.polyval(np.polyder(poly), x0), np.polyval(np.polyder(poly, 2), x0)
        b0 = v0 * (d2 * (2 / 3 * x0 / v0) ** 2 + d1 * (10 / 9) * x0 / v0**2)
        return cls(float(v0), float(np.polyval(poly, x0)), float(b0 / units.GPa))


@dataclass(frozen=True)
class EOSScan:
    volumes: list[float]  # per atom
    energies: list[float]  # per atom
    fit: EOSFit


def energy_per_atom(atoms: Atoms, calc: Calculator) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    return float(atoms.get_potential_energy()) / len(atoms)


def scaled(atoms: Atoms, volume_per_atom: float) -> Atoms:
    """``atoms`` scaled isotropically to ``volume_per_atom``, fractional positions kept."""
    out = atoms.copy()
    factor = (volume_per_atom * len(atoms) / atoms.get_volume()) ** (1 / 3)
    out.set_cell(atoms.cell * factor, scale_atoms=True)
    return out


def eos_scan(atoms: Atoms, calc: Calculator, volume_range: float = 0.1, points: int = 11) -> EOSScan:
    """E(V) over +- ``volume_range`` of the calculator's own V0: centred on ``atoms``' volume
    first, then once more on the V0 found there (a start far from the minimum is common:
    the data's lowest-energy structure need not sit at the potential's V0)."""
    centre = atoms.get_volume() / len(atoms)
    for _ in range(3):
        volumes = centre * np.linspace(1 - volume_range, 1 + volume_range, points)
        energies = np.array([energy_per_atom(scaled(atoms, v), calc) for v in volumes])
        fit = EOSFit.fit(volumes, energies)
        if abs(fit.v0 / centre - 1) < volume_range / 4:
            break
        centre = min(max(fit.v0, centre * (1 - volume_range)), centre * (1 + volume_range))
    return EOSScan([float(v) for v in volumes], [float(e) for e in energies], fit)


def cubic_lattice_constant(phase: str, v0: float) -> float | None:
    """The conventional cubic cell's edge at ``v0`` per atom (fcc: 4 atoms, bcc: 2)."""
    per_cell = {"fcc": 4, "bcc": 2}.get(phase)
    return None if per_cell is None else (per_cell * v0) ** (1 / 3)


@dataclass(frozen=True)
class CubicElastic:
    c11: float
    c12: float
    c44: float

    @property
    def born_stable(self) -> bool:
        return self.c11 - self.c12 > 0 and self.c11 + 2 * self.c12 > 0 and self.c44 > 0


def cubic_elastic(conventional: Atoms, calc: Calculator, strain: float = 0.01) -> CubicElastic:
    """C11, C12, C44 from stresses under +-``strain`` (central differences, half and full
    strain averaged). Ions are not relaxed: in an fcc or bcc crystal every atom is an
    inversion centre, so a homogeneous strain leaves no force on it."""
    def stress(eps: np.ndarray) -> np.ndarray:
        atoms = conventional.copy()
        atoms.set_cell(conventional.cell @ (np.eye(3) + eps), scale_atoms=True)
        atoms.calc = calc
        return atoms.get_stress(voigt=True) / units.GPa  # xx yy zz yz xz xy

    c11, c12, c44 = [], [], []
    for d in (strain / 2, strain):
        normal = np.zeros((3, 3))
        normal[0, 0] = d
        s_plus, s_minus = stress(normal), stress(-normal)
        c11.append((s_plus[0] - s_minus[0]) / (2 * d))
        c12.append((s_plus[1] + s_plus[2] - s_minus[1] - s_minus[2]) / (4 * d))
        shear = np.zeros((3, 3))
        shear[1, 2] = shear[2, 1] = d / 2  # engineering shear strain d
        c44.append((stress(shear)[3] - stress(-shear)[3]) / (2 * d))
    return CubicElastic(float(np.mean(c11)), float(np.mean(c12)), float(np.mean(c44)))


def pair_radius(a: str, b: str) -> float:
    """The sum of covalent radii of a pair, Angstrom: the length that scales pair checks."""
    return float(covalent_radii[Atoms(a).numbers[0]] + covalent_radii[Atoms(b).numbers[0]])


@dataclass(frozen=True)
class DimerCurve:
    pair: str
    distances: list[float]
    energies: list[float]  # eV, relative to the two atoms apart (beyond the cutoff)
    check_distance: float
    energy_at_check: float
    r_min: float  # the first minimum coming from short range: the energy falls all the way to it
    min_floor: float  # a first minimum closer than this is a spurious well

    @property
    def repulsive(self) -> bool:
        return self.r_min >= self.min_floor


def dimer_curve(a: str, b: str, calc: Calculator, r_start: float, r_end: float, step: float,
                check_distance: float | None = None, well_fraction: float = 0.6) -> DimerCurve:
    """E(r) of an isolated a-b pair, its first minimum from short range (below it the energy
    falls monotonically with distance, by definition), which must not lie closer than
    ``well_fraction`` of the covalent-radius sum (a spurious well where atoms fuse), and the
    energy at ``check_distance``."""
    def energy(r: float) -> float:
        atoms = Atoms(f"{a}{b}", positions=[[0, 0, 0], [r, 0, 0]], cell=[r + 30, 30, 30], pbc=False)
        atoms.center()
        atoms.calc = calc
        return float(atoms.get_potential_energy())

    check = check_distance if check_distance is not None else min(1.0, pair_radius(a, b) / 2)
    distances = np.arange(r_start, r_end + 1e-9, step)
    apart = energy(r_end + 5.0)
    energies = np.array([energy(r) for r in distances]) - apart
    at_check = energy(check) - apart
    if not np.all(np.isfinite(energies)) or not math.isfinite(at_check):
        raise PropertyError(f"dimer {a}-{b}: non-finite energies")
    k_min = 0
    for k, e in enumerate(energies):
        if e < energies[k_min]:
            k_min = k
        elif e > energies[k_min] + 1e-3:  # rising again (1 meV tolerance): k_min was the first minimum
            break
    return DimerCurve(
        pair=f"{a}-{b}", distances=[float(r) for r in distances], energies=[float(e) for e in energies],
        check_distance=float(check), energy_at_check=at_check, r_min=float(distances[k_min]),
        min_floor=well_fraction * pair_radius(a, b),
    )


def supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    """``atoms`` repeated about evenly along its axes until it holds at least ``min_atoms``."""
    reps = np.ones(3, int)
    lengths = atoms.cell.lengths()
    while len(atoms) * reps.prod() < min_atoms:
        reps[int(np.argmin(lengths * reps))] += 1
    return atoms.repeat(tuple(int(r) for r in reps))


def vacancy_formation_energy(bulk_cell: Atoms, calc: Calculator, fmax: float = 0.02, steps: int = 200) -> float:
    """E_f = E(N-1, ions relaxed at fixed cell) - (N-1)/N E(N), eV."""
    from ase.optimize import FIRE

    perfect = bulk_cell.copy()
    perfect.calc = calc
    e_perfect = float(perfect.get_potential_energy())
    defect = bulk_cell.copy()
    del defect[0]
    defect.calc = calc
    FIRE(defect, logfile=None).run(fmax=fmax, steps=steps)
    n = len(bulk_cell)
    return float(defect.get_potential_energy()) - (n - 1) / n * e_perfect
