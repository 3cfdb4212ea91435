"""A small labelled copper dataset for the demo and the tests, made on the spot.

ASE's EMT stands in for DFT: energy-volume curves of fcc and bcc, strained and
rattled fcc supercells, and a few hot frames in which two atoms collided (a pair
inside the ZBL outer cutoff, so the delta baseline is not zero everywhere). It
takes about a second and needs nothing downloaded.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.config import Evaluator, TrainConfig
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.validate.settings import ValidationConfig

FCC_A = 3.61
# The demo loop's and the benchmark's candidate pool: imbalanced as MD harvests are,
# mostly near-equilibrium frames and a few of the kinds a first potential has not seen.
# The hot frames' closest pair, Angstrom: inside the default ZBL outer cutoff (2 A), where
# the baseline is 0.01-0.2 eV, but not so close that a tiny fit cannot follow EMT there.
COLLISION_DISTANCES = (1.85, 1.9, 1.95)
CANDIDATE_SHARES = {"equilibrium": 0.80, "hot_md": 0.06, "vacancy": 0.05, "surface": 0.04, "compressed": 0.05}


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
    for distance in COLLISION_DISTANCES:
        out.append((collision_frame(distance, rng), "fcc_hot_collision"))
    labelled = []
    for atoms, ctype in out:
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        row = atoms.copy()
        row.calc = SinglePointCalculator(row, energy=energy, forces=forces)
        labelled.append((row, ctype))
    return labelled


def collision_frame(distance: float, rng: np.random.Generator) -> Atoms:
    """A rattled 32-atom fcc cell in which atom 0 was pushed along the line to its nearest
    neighbour until the two are ``distance`` apart, as in a hot MD frame."""
    atoms = bulk("Cu", "fcc", a=FCC_A, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
    others = np.arange(1, len(atoms))
    nearest = int(others[np.argmin(atoms.get_distances(0, others, mic=True))])
    bond = atoms.get_distance(0, nearest, mic=True, vector=True)
    atoms.positions[0] += bond * (1.0 - distance / np.linalg.norm(bond))
    return atoms


def write_example_database(db: DatabaseManager, seed: int = 7) -> int:
    """Add the example structures to ``db`` as TRAINING_READY rows; returns how many."""
    count = 0
    for atoms, ctype in example_structures(seed):
        db.add_structure(
            atoms, atoms.calc.results["energy"], atoms.calc.results["forces"], ctype, status=StructureStatus.TRAINING_READY
        )
        count += 1
    return count


def candidate_structure(kind: str, rng: np.random.Generator) -> Atoms:
    """One unlabelled copper cell of ``kind`` (a key of CANDIDATE_SHARES)."""
    seed = int(rng.integers(1 << 30))
    if kind == "equilibrium":
        atoms = bulk("Cu", "fcc", a=FCC_A * rng.uniform(0.99, 1.01), cubic=True).repeat(2)
        atoms.rattle(0.03, seed=seed)
    elif kind == "hot_md":
        atoms = bulk("Cu", "fcc", a=FCC_A * rng.uniform(1.0, 1.02), cubic=True).repeat(2)
        atoms.rattle(rng.uniform(0.15, 0.25), seed=seed)
    elif kind == "vacancy":
        atoms = bulk("Cu", "fcc", a=FCC_A, cubic=True).repeat(2)
        del atoms[int(rng.integers(len(atoms)))]
        atoms.rattle(0.05, seed=seed)
    elif kind == "surface":
        atoms = fcc100("Cu", (2, 2, 4), a=FCC_A, vacuum=6.0, periodic=True)
        atoms.rattle(0.05, seed=seed)
    elif kind == "compressed":
        atoms = bulk("Cu", "fcc", a=FCC_A * rng.uniform(0.88, 0.93), cubic=True).repeat(2)
        atoms.rattle(0.05, seed=seed)
    else:
        raise ValueError(f"unknown candidate kind {kind!r} (known: {', '.join(CANDIDATE_SHARES)})")
    return atoms


def candidate_pool(size: int, seed: int = 11) -> list[tuple[Atoms, str]]:
    """About ``size`` unlabelled (atoms, kind) pairs in CANDIDATE_SHARES proportions."""
    rng = np.random.default_rng(seed)
    return [(candidate_structure(kind, rng), kind) for kind, share in CANDIDATE_SHARES.items()
            for _ in range(max(1, round(share * size)))]


def write_example_candidates(db: DatabaseManager, size: int = 200, seed: int = 11) -> int:
    """Add the candidate pool to ``db`` as CANDIDATE rows (config_type = kind); returns how many."""
    pool = candidate_pool(size, seed)
    for atoms, kind in pool:
        db.add_candidate(atoms, kind, generator="example_data")
    return len(pool)


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
    """A toy fit (16 functions, 20 iterations: seconds on pyace) for fast tests; not validated
    (a toy is no material: it would be REJECTED, and its validation would cost more than its fit)."""
    return TrainConfig(
        b_basis_size=16, max_degree=2, maxiter=20, energy_weight=1.0, force_weight=1.0, batch_size=50,
        validation=ValidationConfig(enabled=False),
    )
