"""A small labelled copper dataset for the demo and the tests, made on the spot.

ASE's EMT stands in for DFT: energy-volume curves of fcc and bcc, strained and
rattled fcc supercells. It takes about a second and needs nothing downloaded.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.config import Evaluator, TrainConfig
from autopipec_hpc.db import DatabaseManager, StructureStatus

FCC_A = 3.61


def example_structures(seed: int = 7) -> list[tuple[Atoms, str]]:
    """(atoms with an EMT single-point calculator, config_type) pairs."""
    rng = np.random.default_rng(seed)
    out: list[tuple[Atoms, str]] = []
    for scale in np.linspace(0.94, 1.08, 8):
        out.append((bulk("Cu", "fcc", a=FCC_A * scale, cubic=True), "fcc_ev"))
    for scale in np.linspace(0.95, 1.07, 6):
        out.append((bulk("Cu", "bcc", a=2.87 * scale, cubic=True), "bcc_ev"))
    for k in range(10):
        atoms = bulk("Cu", "fcc", a=FCC_A * rng.uniform(0.97, 1.03), cubic=True).repeat(2)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        out.append((atoms, "fcc_rattled"))
    for k in range(6):
        atoms = bulk("Cu", "fcc", a=FCC_A, cubic=True)
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.rattle(0.03, seed=int(rng.integers(1 << 30)))
        out.append((atoms, "fcc_strained"))
    labelled = []
    for atoms, ctype in out:
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        row = atoms.copy()
        row.calc = SinglePointCalculator(row, energy=energy, forces=forces)
        labelled.append((row, ctype))
    return labelled


def write_example_database(db: DatabaseManager, seed: int = 7) -> int:
    """Add the example structures to ``db`` as TRAINING_READY rows; returns how many."""
    count = 0
    for atoms, ctype in example_structures(seed):
        db.add_structure(
            atoms, atoms.calc.results["energy"], atoms.calc.results["forces"], ctype, status=StructureStatus.TRAINING_READY
        )
        count += 1
    return count


def demo_train_config(evaluator: Evaluator | str = Evaluator.TENSORPOT) -> TrainConfig:
    """The demo's fit: 100 functions per element (464 parameters for Cu), 200
    iterations on pacemaker's TensorFlow evaluator, about a minute on two cores.

    pyace has no analytic gradient (a gradient costs parameters + 1 loss
    evaluations), so without TensorFlow the demo falls back to a tiny basis.
    """
    if str(evaluator) == Evaluator.PYACE:
        return tiny_train_config()
    return TrainConfig(b_basis_size=100, max_degree=4, maxiter=200, energy_weight=1.0, force_weight=1.0)


def tiny_train_config() -> TrainConfig:
    """A toy fit (16 functions, 20 iterations: seconds on pyace) for fast tests."""
    return TrainConfig(
        b_basis_size=16, max_degree=2, maxiter=20, energy_weight=1.0, force_weight=1.0, batch_size=50
    )
