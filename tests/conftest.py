"""Shared fixtures and the two gates on what the machine has.

Markers (pyproject.toml) decide what a test needs, and the gates here skip it, with one
line, where that is absent:

- ``pacemaker``: the ``pacemaker`` console script beside this interpreter and ``import pyace``
  (pip install -e .[pacemaker]). Fails instead of skipping where AUTOPIPEC_REQUIRE_PACEMAKER=1.
- ``slurm``: a SLURM cluster with a gpu partition answers (scripts/slurm/up.sh). Fails instead
  of skipping where AUTOPIPEC_REQUIRE_SLURM=1 (scripts/test.sh sets both).

The gates run before any fixture, so a module-scoped fit (``trained``) is not trained for
tests that would be skipped anyway. Plain helpers are in tests/helpers.py.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.example_data import tiny_train_config, write_example_database
from autopipec_hpc.store import DatabaseManager
from tests.helpers import CU_DFT, PACEMAKER, TOY_EVALUATOR, postgres_database, tiny_site


@functools.cache
def pacemaker_missing() -> str | None:
    """Why pacemaker cannot run here, in one line, or None where it can."""
    if not PACEMAKER.exists():
        return f"needs pacemaker: {PACEMAKER} does not exist (pip install -e .[pacemaker])"
    try:
        import pyace  # noqa: F401
    except ImportError as exc:
        return f"needs pacemaker: import pyace fails ({exc}) (pip install -e .[pacemaker])"
    if TOY_EVALUATOR == "tensorpot":  # found, not imported: TensorFlow costs seconds and memory here
        import importlib.util

        absent = [name for name in ("tensorflow", "tensorpotential") if importlib.util.find_spec(name) is None]
        if absent:
            return f"needs pacemaker's tensorpot evaluator: {', '.join(absent)} not installed (bash scripts/bootstrap.sh)"
    return None


@functools.cache
def slurm_missing() -> str | None:
    """Why no SLURM cluster is usable here, in one line, or None where one answers."""
    if shutil.which("sinfo") is None:
        return "SLURM client commands are not installed"
    try:
        done = subprocess.run(["sinfo", "-h", "-p", "gpu", "-o", "%a"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if done.returncode != 0 or "up" not in done.stdout:
        return f"no SLURM cluster with a gpu partition answers ({done.stderr.strip()})"
    return None


def _gate(problem: str | None, required: str, hint: str) -> None:
    if problem is None:
        return
    if os.environ.get(required) == "1":
        pytest.fail(f"{required}=1 but {problem}", pytrace=False)
    pytest.skip(f"{problem}{hint}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("pacemaker"):
        _gate(pacemaker_missing(), "AUTOPIPEC_REQUIRE_PACEMAKER", "")
    if item.get_closest_marker("slurm"):
        _gate(slurm_missing(), "AUTOPIPEC_REQUIRE_SLURM", ": start one with `bash scripts/slurm/up.sh`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test of the ``trained`` fit without the ``pacemaker`` marker would fail, not skip,
    where pacemaker is missing: refuse it by name."""
    unmarked = [item.nodeid for item in items
                if "trained" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("pacemaker")]
    if unmarked:
        raise pytest.UsageError(f"uses the `trained` fit without the pacemaker marker: {', '.join(unmarked)}")


# -- data ------------------------------------------------------------------------------------

@pytest.fixture
def cu_dft_path() -> Path:
    if not CU_DFT.exists():
        pytest.skip(f"real DFT data not present at {CU_DFT} (../shared is absent)")
    return CU_DFT


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


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, then one on the PostgreSQL test server."""
    if request.param == "sqlite":
        return str(tmp_path / "records.db")
    return postgres_database()


# -- sites -----------------------------------------------------------------------------------

@pytest.fixture
def local_site(tmp_path):
    """Makes local-executor sites whose work, output folders and database lie in ``tmp_path``."""

    def make(command: str = "pacemaker", evaluator: str = TOY_EVALUATOR) -> SiteConfig:
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generation 1 trained on the 30 example structures (tensorpot, 16 functions, 20 iterations):
    ``(root, site, record)``. Tests that use it carry the ``pacemaker`` marker; copy its
    database (helpers.copy_db) before changing anything."""
    from autopipec_hpc.submission import train_generation

    root = tmp_path_factory.mktemp("al")
    site = tiny_site(root)
    write_example_database(DatabaseManager(site.database))
    record = train_generation(site, tiny_train_config(), timeout_s=900)
    return root, site, record
