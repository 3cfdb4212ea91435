"""Plain helpers shared by the test modules (fixtures live in conftest.py).

No test module imports from another test module: what two of them share is here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.config import SiteConfig

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
CU_DFT = SHARED / "data" / "cu_fhiaims_105.extxyz"
DATA = Path(__file__).resolve().parent / "data"
CI_SITE = PROJECT / "site_configs" / "slurm-ci.yaml"
# The pacemaker console script of this interpreter's environment (pip install -e .[pacemaker]).
PACEMAKER = Path(sys.executable).parent / "pacemaker"

# The command line in a fresh process, as a user runs it.
CLI = [sys.executable, "-m", "autopipec_hpc.cli"]


def run_cli(*argv: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``autopipec-hpc *argv`` in a new interpreter, its output captured as text."""
    return subprocess.run([*CLI, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


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


# -- PostgreSQL (scripts/postgres/up.sh) ------------------------------------------------------

def postgres_database() -> str:
    """A fresh database on the test server of scripts/postgres/up.sh; skips without one
    (fails where AUTOPIPEC_REQUIRE_POSTGRES=1, as scripts/test.sh sets)."""
    url = os.environ.get("AUTOPIPEC_TEST_POSTGRES")
    if not url:
        if os.environ.get("AUTOPIPEC_REQUIRE_POSTGRES") == "1":
            pytest.fail("AUTOPIPEC_REQUIRE_POSTGRES=1 but AUTOPIPEC_TEST_POSTGRES is not set")
        pytest.skip("no PostgreSQL: start one with `bash scripts/postgres/up.sh` and source its env.sh")
    from autopipec_hpc.testing.postgres import new_database

    return new_database(url)


# -- SLURM (scripts/slurm/up.sh) -------------------------------------------------------------

def ci_site(root: Path, **changes) -> SiteConfig:
    """slurm-ci.yaml with folders of this test's own (job ids restart with the cluster)."""
    base = SiteConfig.from_yaml(CI_SITE).model_dump(mode="json")
    base.update(work_dir=str(root / "runs"), output_dir=str(root / "output"), database=str(root / "structures.db"))
    for key, value in changes.items():
        if isinstance(value, dict):
            base[key] = {**(base.get(key) or {}), **value}
        else:
            base[key] = value
    return SiteConfig.model_validate(base)


def wait_state(job_id: str, wanted: set[str], timeout_s: float = 60, name: str | None = None) -> str:
    """sacct's state of ``job_id`` (named ``name``) once it is one of ``wanted``, or at the timeout."""
    from autopipec_hpc.scheduler.slurm import sacct_state

    deadline = time.monotonic() + timeout_s
    state = sacct_state(job_id, name)
    while state not in wanted and time.monotonic() < deadline:
        time.sleep(1)
        state = sacct_state(job_id, name)
    return state


# -- active learning: the site of the ``trained`` fixture and candidates around it -----------

# The tests' toy fits (tiny_train_config: 116 parameters, 20 iterations) train on pacemaker's
# TensorFlow evaluator: pyace has no analytic gradient, so each iteration costs it 117 loss
# evaluations, 88 s a fit on the example data against tensorpot's 20 s (startup included).
# A fit that a time limit must strike mid-way is made long (maxiter), not slow: pyace resumed
# near a minimum can stall a whole attempt (test_slurm's time-limit test says why).
TOY_EVALUATOR = "tensorpot"


def tiny_site(root: Path) -> SiteConfig:
    """A local site in ``root`` training toy fits on 2 cores (the ``trained`` fixture's)."""
    return SiteConfig(name="al-test", scheduler="local", work_dir=root / "runs", output_dir=root / "output",
                      database=str(root / "structures.db"),
                      pacemaker={"command": "pacemaker", "evaluator": TOY_EVALUATOR}, train={"cpus": 2})


def copy_db(trained, tmp_path: Path) -> str:
    """A copy of the ``trained`` fixture's database in ``tmp_path`` (the fixture's own stays as it was)."""
    _, site, _ = trained
    path = tmp_path / "structures.db"
    shutil.copy(site.database, path)
    return str(path)


def near_candidates(n=8, seed=11):
    """Strained and rattled fcc copper: close to the example data, low extrapolation grades."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61 * rng.uniform(0.98, 1.02), cubic=True).repeat(2)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def far_candidates():
    """Squeezed bulk, a slab and a hot rattle: far from the example data, high grades."""
    from ase.build import fcc111

    squeezed = bulk("Cu", "fcc", a=3.0, cubic=True).repeat(2)
    squeezed.rattle(0.05, seed=1)
    slab = fcc111("Cu", (2, 2, 3), a=3.61, vacuum=5.0, periodic=True)
    hot = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    hot.rattle(0.35, seed=2)
    return [squeezed, slab, hot]


def toy_validated_config():
    """The toy fit with a quick validation that rejects it: cheap properties, and a B0 gate of
    5 % (the toy's B0 is 12 % off EMT's, 148 against 133 GPa, so the verdict does not hang on
    the default 10 %); the divergence limits out of the way, so the validation decides."""
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.validate.settings import ValidationConfig, ValidationGates

    quick = ValidationConfig(supercell_atoms=32, md_steps=200, md_nve_steps=20, md_quench_steps=20,
                             gates=ValidationGates(b0_tolerance=0.05))
    return tiny_train_config().model_copy(update={"validation": quick, "max_energy_rmse_mev": 1e5,
                                                  "max_force_rmse_mev": 1e6})
