"""What is published stays recorded: a warm start's parent is read before the claim, and a
retrain of a published generation that fails leaves the published record in place."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from autopipec_hpc.cli import main
from autopipec_hpc.example_data import tiny_train_config, write_example_database
from autopipec_hpc.registry import MANIFEST, POTENTIAL_YAML, PotentialManifest
from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
from tests.helpers import copy_db, tiny_site


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _parent_with(potential_text: str, root: Path) -> tuple[str, Path]:
    """A database of the example cells whose generation 1 is SUCCEEDED and published in a
    folder holding a valid manifest beside ``potential_text`` as its potential.yaml."""
    database = str(root / "structures.db")
    db = DatabaseManager(database)
    write_example_database(db)
    folder = root / "output" / "potentials" / "1"
    folder.mkdir(parents=True)
    manifest = PotentialManifest(generation=1, elements=["Cu"], zbl_inner=1.0, zbl_outer=2.0,
                                 reference_energies={"Cu": -3.5}, files=[POTENTIAL_YAML], published_at=time.time())
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest)))
    (folder / POTENTIAL_YAML).write_text(potential_text)
    db.write_record(1, RecordState.SUCCEEDED, values={"potential_path": str(folder), "run_dir": str(root / "gen-1")},
                    data={"config": tiny_train_config().model_dump(mode="json")})
    return database, folder / POTENTIAL_YAML


@pytest.mark.parametrize("garbage", [
    "species: [{speciesblock: Cu, nradmaxi: 2, lmaxi: [1",  # truncated
    "\x00\x01 not yaml at all: [",
    "just a line of text",
    "metadata: {}\n",  # YAML, but no potential in it
])
def test_a_warm_start_from_a_garbage_parent_is_refused_before_the_claim(tmp_path, capsys, monkeypatch, garbage):
    # The parent's potential.yaml was parsed only after the generation was claimed: a FAILED
    # record of generation 2 and a run folder were left behind.
    database, potential = _parent_with(garbage, tmp_path)
    site = tiny_site(tmp_path).model_copy(update={"database": database})
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(site.model_dump(mode="json")))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(tiny_train_config().model_dump(mode="json")))
    before = _digest(database)
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "--site", str(site_file), "--config", str(config_file), "--from-generation", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and str(potential) in err and "not a readable potential" in err
    assert _digest(database) == before  # no record of generation 2, nothing else written
    assert DatabaseManager(database).get_record(2) is None
    assert not (tmp_path / "runs").exists()


# -- a retrain that fails, on a real published generation (pacemaker) --------------------------

@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_forced_retrain_that_fails_keeps_the_published_generation_usable(trained, tmp_path, capsys):
    from autopipec_hpc.active.selection import published_potential
    from autopipec_hpc.errors import TrainingFailedError
    from autopipec_hpc.generation import wait_for_generation
    from autopipec_hpc.submission import submit_generation
    from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker
    from autopipec_hpc.warm_start import check_warm_start

    _, _, published = trained
    database = copy_db(trained, tmp_path)
    from autopipec_hpc.config import PacemakerSetup

    crash = tiny_site(tmp_path).model_copy(update={
        "database": database, "pacemaker": PacemakerSetup(command=str(make_fault_pacemaker(tmp_path, "crash")),
                                                          evaluator="pyace")})
    sub = submit_generation(database, crash, tiny_train_config(), generation=1, force=True)
    with pytest.raises(TrainingFailedError, match="FAILED: pacemaker exited with code 1") as info:
        wait_for_generation(Path(sub.spec.run_dir), timeout_s=300)  # the retrain's waiter hears its failure
    assert "bad_alloc" in info.value.log_tail

    db = DatabaseManager(database)
    record = db.get_record(1)
    assert record.status == RecordState.SUCCEEDED and record.run_dir == published.run_dir
    assert record.potential_path == published.potential_path and (published.potential_path / POTENTIAL_YAML).exists()
    assert record.test_energy_rmse_mev == published.test_energy_rmse_mev and record.metrics == published.metrics
    assert sub.spec.run_dir in record.reason and "FAILED" in record.reason
    assert record.data["retrains"][-1]["status"] == "FAILED"
    # select and --from-generation still see the published generation
    assert published_potential(db, 1) == published.potential_path
    config, parent = check_warm_start(database, tiny_train_config().model_copy(update={"warm_start": 1}))
    assert parent.generation == 1 and parent.folder == published.potential_path
    # and `status` shows it SUCCEEDED, not FAILED beside a published potential
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(crash.model_dump(mode="json")))
    assert main(["status", "--site", str(site_file)]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "FAILED" not in out.split("SUCCEEDED")[0]
