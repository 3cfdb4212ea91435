"""Shared fixtures: paths to real data, small labelled structures, the example database, a local site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.example_data import write_example_database

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
CU_DFT = SHARED / "data" / "cu_fhiaims_105.extxyz"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def cu_dft_path() -> Path:
    if not CU_DFT.exists():
        pytest.skip(f"real DFT data not present at {CU_DFT} (../shared is absent)")
    return CU_DFT


def labelled(atoms: Atoms, energy: float, forces=None, db_id=None, config_type="bulk") -> Atoms:
    atoms = atoms.copy()
    forces = np.zeros((len(atoms), 3)) if forces is None else forces
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    if db_id is not None:
        atoms.info["db_id"] = db_id
    atoms.info["config_type"] = config_type
    return atoms


def random_cell(seed: int, symbols=("H", "O", "Cu", "Au", "U"), n=12, min_dist=0.6) -> Atoms:
    """A random periodic triclinic cell of mixed elements with no pair closer than min_dist."""
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(4.0, 6.0, 3)) + rng.uniform(-0.8, 0.8, (3, 3))
    while True:
        frac = rng.random((n, 3))
        atoms = Atoms(symbols=list(rng.choice(symbols, n)), scaled_positions=frac, cell=cell, pbc=True)
        d = atoms.get_all_distances(mic=True)
        if d[np.triu_indices(n, 1)].min() > min_dist:
            return atoms


@pytest.fixture
def cu_bulk() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=3)
    return atoms


@pytest.fixture
def example_db(tmp_path) -> str:
    """The demo's 30 EMT copper structures in a fresh database: the sites' database below."""
    path = str(tmp_path / "structures.db")
    write_example_database(DatabaseManager(path))
    return path


@pytest.fixture
def local_site(tmp_path):
    """Makes local-executor sites whose work, output folders and database lie in ``tmp_path``."""

    def make(command: str = "pacemaker", evaluator: str = "pyace") -> SiteConfig:
        return SiteConfig(
            name="test-local",
            scheduler="local",
            work_dir=tmp_path / "runs",
            output_dir=tmp_path / "output",
            database=str(tmp_path / "structures.db"),
            pacemaker={"command": command, "evaluator": evaluator},
            train={"cpus": 2},
        )

    return make
