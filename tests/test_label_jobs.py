"""Labelling as scheduler work (issue 17): labeller.yaml, checks on each result, failures
tagged LABEL_FAILED with their reason, tasks that die reconciled, GPAW for real.

The fast tests run label arrays on the local executor (one process per task) with EMT and
a FAULT INJECTOR (``testing/fault_labeller.py``) for the failures no real code shows on
demand; GPAW's own KohnShamConvergenceError is provoked for real (too few SCF iterations).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk

from autopipec_hpc.active.label_array import run_labels
from autopipec_hpc.active.label_checks import check_result
from autopipec_hpc.active.label_folder import LabelFolder
from autopipec_hpc.active.labeller_config import LabellerConfig, labeller_template
from autopipec_hpc.cli import main
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from tests.helpers import near_candidates

FAULTS = "autopipec_hpc.testing.fault_labeller:FaultInjectingEMT"


def gpaw_available() -> bool:
    try:
        import gpaw  # noqa: F401
    except ImportError:
        if os.environ.get("AUTOPIPEC_REQUIRE_GPAW") == "1":
            pytest.fail("AUTOPIPEC_REQUIRE_GPAW=1 but gpaw cannot be imported (scripts/bootstrap.sh installs it)")
        return False
    return True


def requested(database: str, n: int, seed: int = 5) -> list[int]:
    db = DatabaseManager(database)
    ids = [db.add_candidate(a, "near") for a in near_candidates(n, seed=seed)]
    db.update_rows([(i, {"status": "DFT_REQUESTED", "selected_by_generation": 1}) for i in ids])
    return ids


def local_site(tmp_path: Path) -> SiteConfig:
    return SiteConfig(work_dir=tmp_path / "runs", output_dir=tmp_path / "output", database=str(tmp_path / "s.db"))


def statuses(database: str, ids: list[int]) -> list[str]:
    db = DatabaseManager(database)
    return [db.get_row(i).status for i in ids]


# -- the labeller config -------------------------------------------------------------------------
@pytest.mark.parametrize("change, culprit", [
    ({"kwargs_typo": {}}, "unknown key 'kwargs_typo'"),
    ({"calculator": "ase.calculators.emt"}, "'calculator'"),
    ({"calculator": "no_such_module_xyz:Calc"}, "no_such_module_xyz"),
    ({"calculator": "ase.calculators.emt:Nope"}, "Nope"),
    ({"calculator": "fractions:Fraction", "kwargs": {"no_such_setting": 1}}, "refused its kwargs"),
    ({"max_failed_fraction": 1.5}, "'max_failed_fraction'"),
    ({"time_limit_s": float("inf")}, "'time_limit_s'"),
    ({"setup": ["module load x\nrm -rf /"]}, "'setup"),
])
def test_a_bad_labeller_config_is_one_line_exit_2_and_nothing_labelled(tmp_path, capsys, monkeypatch, change,
                                                                       culprit):
    monkeypatch.chdir(tmp_path)
    database = str(tmp_path / "s.db")
    ids = requested(database, 1)
    config = {"name": "emt", "calculator": "ase.calculators.emt:EMT", **change}
    path = tmp_path / "labeller.yaml"
    path.write_text(yaml.safe_dump(config) if "inf" not in str(change) else
                    yaml.safe_dump({**config, "time_limit_s": ".inf"}).replace("'.inf'", ".inf"))
    assert main(["label", "--db", database, "--labeller", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err and str(path) in err, err
    assert statuses(database, ids) == ["DFT_REQUESTED"]
    assert not (tmp_path / "output").exists()


def test_labeller_template_runs_as_is_and_the_level_names_name_and_settings():
    generic = LabellerConfig.model_validate(yaml.safe_load(labeller_template()))
    assert generic.calculator == "ase.calculators.emt:EMT" and generic.max_failed_fraction == 0.05
    other = generic.model_copy(update={"kwargs": {"asap_cutoff": True}})
    assert generic.level.startswith("emt#") and other.settings_hash != generic.settings_hash
    assert generic.model_copy(update={"structures_per_task": 9}).settings_hash == generic.settings_hash
    if gpaw_available():
        gpaw = LabellerConfig.model_validate(yaml.safe_load(labeller_template(gpaw=True)))
        gpaw.check_calculator()
        assert gpaw.provenance()["labeller_code"] == "gpaw"


# -- checks on each result -----------------------------------------------------------------------
def test_each_check_names_what_it_refuses():
    labeller = LabellerConfig(name="x", calculator="ase.calculators.emt:EMT")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    good = np.zeros((4, 3))
    assert check_result(atoms, atoms, -1.0, good, labeller) is None
    assert "non-finite energy" in check_result(atoms, atoms, float("nan"), good, labeller)
    assert "shape (3, 3)" in check_result(atoms, atoms, -1.0, np.zeros((3, 3)), labeller)
    assert "non-finite forces" in check_result(atoms, atoms, -1.0, np.full((4, 3), np.inf), labeller)
    assert "net force" in check_result(atoms, atoms, -1.0, np.ones((4, 3)), labeller)
    moved = atoms.copy()
    moved.positions[1] += 0.05
    assert "moved the atoms" in check_result(atoms, moved, -1.0, good, labeller)


# -- failures tagged, the rest labelled, --retry-failed --------------------------------------------
def test_failures_are_tagged_with_their_reason_and_retry_failed_relabels_only_them(tmp_path, capsys):
    database = str(tmp_path / "s.db")
    ids = requested(database, 6)
    fail, nan, slow, move = ids[1], ids[2], ids[3], ids[4]
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump({
        "name": "emt-faults", "calculator": FAULTS, "time_limit_s": 0.5, "retries": 1, "structures_per_task": 3,
        "kwargs": {"fail_rows": [fail], "nan_rows": [nan], "slow_rows": [slow], "move_rows": [move], "sleep_s": 3}}))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(local_site(tmp_path).model_dump(mode="json")))
    assert main(["label", "--site", str(site), "--db", database, "--labeller", str(path)]) == 0
    out = capsys.readouterr().out
    db = DatabaseManager(database)
    rows = {i: db.get_row(i) for i in ids}
    assert [rows[i].status for i in ids] == ["TRAINING_READY", "LABEL_FAILED", "LABEL_FAILED", "LABEL_FAILED",
                                             "LABEL_FAILED", "TRAINING_READY"]
    assert rows[fail].label_error == f"InjectedFault: injected failure on row {fail}"
    assert "non-finite energy" in rows[nan].label_error
    assert rows[slow].label_error.startswith("LabelTimeout: over the per-structure time limit of 1 s")  # retried, 2x
    assert "moved the atoms" in rows[move].label_error
    for i in ids:  # provenance on every row, labelled or failed
        assert rows[i].labeller == "emt-faults" and rows[i].labeller_code == "autopipec_hpc"
        assert len(rows[i].labeller_hash) == 16 and "label_claimed_by" not in rows[i]
    assert "2 labelled, 4 failed (LabelCheckFailed 2, InjectedFault 1, LabelTimeout 1), 1 retried" in out
    labelled_at = {i: rows[i].mtime for i in (ids[0], ids[5])}

    assert main(["label", "--site", str(site), "--db", database, "--calculator", "ase.calculators.emt:EMT",
                 "--retry-failed"]) == 0
    assert "4 labelled, 0 failed, 4 retried of 4" in capsys.readouterr().out
    rows = {i: db.get_row(i) for i in ids}
    assert all(r.status == "TRAINING_READY" for r in rows.values())
    assert {i: rows[i].mtime for i in (ids[0], ids[5])} == labelled_at  # the labelled ones untouched
    assert all(rows[i].label_retries == 1 and rows[i].labeller == "ase.calculators.emt.EMT"
               for i in (fail, nan, slow, move))


def test_a_task_killed_mid_row_leaves_its_rows_requested_and_a_rerun_completes(tmp_path):
    database = str(tmp_path / "s.db")
    ids = requested(database, 4)
    site = local_site(tmp_path)
    killer = LabellerConfig(name="emt", calculator=FAULTS, structures_per_task=2,
                            kwargs={"kill_rows": [ids[2]], "kill_marker": str(tmp_path / "killed")})
    summary = run_labels(site, DatabaseManager(database), killer, timeout_s=120, notify=print)
    # task 0 labelled both; task 1 died (SIGKILL) computing ids[2]; ids[3] was never claimed
    assert statuses(database, ids) == ["TRAINING_READY", "TRAINING_READY", "DFT_REQUESTED", "DFT_REQUESTED"]
    assert summary.labelled == ids[:2] and summary.returned == ids[2:] and not summary.failed
    assert "ended FAILED" in DatabaseManager(database).get_row(ids[2]).label_error
    again = run_labels(site, DatabaseManager(database), killer, timeout_s=120)
    assert again.labelled == ids[2:] and statuses(database, ids) == ["TRAINING_READY"] * 4


def test_a_row_that_kills_its_task_every_time_ends_label_failed_and_costs_no_more_tasks(tmp_path):
    """Before: a row whose labeller dies on it (out of memory, a crash of the code) went back
    to DFT_REQUESTED after every death, and each rerun or loop generation spent a task on it."""
    database = str(tmp_path / "s.db")
    ids = requested(database, 3)
    site = local_site(tmp_path)
    killer = LabellerConfig(name="emt", calculator=FAULTS, structures_per_task=1,
                            kwargs={"kill_rows": [ids[1]]})  # no marker: it dies on that row every time
    db = DatabaseManager(database)
    first = run_labels(site, db, killer, timeout_s=120)
    assert first.labelled == [ids[0], ids[2]] and first.returned == [ids[1]]
    assert db.get_row(ids[1]).label_deaths == 1
    second = run_labels(site, db, killer, timeout_s=120)
    assert second.returned == [] and list(second.failed) == [ids[1]]
    assert second.failed[ids[1]].startswith("LabelTaskDied: its labeller died while computing it 2 times")
    assert "ended FAILED" in second.failed[ids[1]]
    assert statuses(database, ids) == ["TRAINING_READY", "LABEL_FAILED", "TRAINING_READY"]
    assert db.count(status="DFT_REQUESTED") == 0  # nothing left for a third run to spend a task on
    retried = run_labels(site, db, LabellerConfig(name="emt", calculator="ase.calculators.emt:EMT"),
                         retry_failed=True, timeout_s=120)
    assert retried.labelled == [ids[1]] and statuses(database, ids) == ["TRAINING_READY"] * 3


def test_status_shows_the_rows_by_status_and_the_label_tasks_holding_rows(tmp_path, capsys):
    import time

    database = str(tmp_path / "s.db")
    ids = requested(database, 2)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(local_site(tmp_path).model_dump(mode="json")))
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump({"name": "emt", "calculator": FAULTS, "structures_per_task": 2,
                                    "kwargs": {"slow_rows": [ids[0]], "sleep_s": 20}}))
    assert main(["label", "--site", str(site), "--db", database, "--labeller", str(slow), "--no-wait"]) == 0
    capsys.readouterr()
    db = DatabaseManager(database)
    deadline = time.monotonic() + 60
    while db.get_row(ids[0]).status != "LABELLING" and time.monotonic() < deadline:
        time.sleep(0.2)
    job = db.get_row(ids[0]).label_job
    assert main(["status", "--site", str(site), "--db", database]) == 0
    out = capsys.readouterr().out
    assert "structures: 2 DFT_REQUESTED" not in out and "1 LABELLING" in out, out
    assert f"labelling: 1 held by label task {job} ({tmp_path / 'labels' / 'gen-1'})" in out, out
    from autopipec_hpc.processes import pid_alive

    os.kill(int(job), 9)  # the task dies: the next status puts its row back
    deadline = time.monotonic() + 30
    while pid_alive(int(job)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert main(["status", "--site", str(site), "--db", database]) == 0
    out = capsys.readouterr().out
    assert "structures: 2 DFT_REQUESTED" in out and "labelling:" not in out, out


# -- GPAW for real ---------------------------------------------------------------------------------
def al_cells(n: int) -> list:
    cells = []
    for k in range(n):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.rattle(0.05, seed=k)
        cells.append(atoms)
    return cells


def gpaw_labeller(**changes) -> LabellerConfig:
    config = yaml.safe_load(labeller_template(gpaw=True))
    for key, value in changes.items():
        if key == "maxiter":
            config["kwargs"]["maxiter"] = value
        else:
            config[key] = value
    return LabellerConfig.model_validate(config)


def test_gpaw_with_too_few_scf_iterations_is_tagged_kohn_sham_convergence_error(tmp_path):
    if not gpaw_available():
        pytest.skip("gpaw is not installed (pip install -e .[dft], see README)")
    from autopipec_hpc.active.label_job import label_rows

    db = DatabaseManager(str(tmp_path / "s.db"))
    [row_id] = [db.add_candidate(a, "al") for a in al_cells(1)]
    db.update_rows([(row_id, {"status": "DFT_REQUESTED"})])
    outcome = label_rows(db, gpaw_labeller(maxiter=3), [row_id])
    row = db.get_row(row_id)
    assert outcome.failed == {row_id: row.label_error} and row.status == StructureStatus.LABEL_FAILED
    assert row.label_error.startswith("KohnShamConvergenceError") and row.labeller_code == "gpaw"


# -- one level of theory per training set ---------------------------------------------------------
def test_mixed_levels_of_theory_are_refused_by_name_unless_one_is_chosen(example_db, tmp_path, capsys):
    from autopipec_hpc.active.label_job import label_rows

    db = DatabaseManager(example_db)
    imported = db.count(status="TRAINING_READY")
    ids = requested(example_db, 4)
    emt = LabellerConfig(name="emt", calculator="ase.calculators.emt:EMT")
    other = LabellerConfig(name="emt-asap", calculator="ase.calculators.emt:EMT", kwargs={"asap_cutoff": True})
    label_rows(db, emt, ids[:3])
    label_rows(db, other, ids[3:])
    out = tmp_path / "data"
    assert main(["prepare", "--db", example_db, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mix levels of theory" in err, err
    assert f"{emt.level} (3 rows)" in err and f"{other.level} (1 rows)" in err and not out.exists()
    config = tmp_path / "train.yaml"
    config.write_text("level_of_theory: emt\n")
    assert main(["prepare", "--db", example_db, "--out", str(out), "--config", str(config)]) == 0
    # the imported rows (no level recorded) and the 3 at the chosen level; not the other's
    assert len(db.ready_structures("TRAINING_READY", emt.level)) == imported + 3
    config.write_text("level_of_theory: dft-nobody-ran\n")
    assert main(["prepare", "--db", example_db, "--out", str(tmp_path / "d2"), "--config", str(config)]) == 2
    assert "dft-nobody-ran" in capsys.readouterr().err


# -- the loop's gate on failed labels ---------------------------------------------------------------
def test_the_loop_trains_on_under_the_failed_fraction_and_stops_over_it_naming_the_failures(tmp_path):
    from autopipec_hpc.active import loop
    from autopipec_hpc.active.label_array import check_label_gate
    from autopipec_hpc.errors import LabellingError
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.states import LoopAction

    database = str(tmp_path / "s.db")
    ids = requested(database, 5)
    db = DatabaseManager(database)
    faults = LabellerConfig(name="emt", calculator=FAULTS, kwargs={"fail_rows": [ids[0]]})
    from autopipec_hpc.active.label_job import label_rows

    label_rows(db, faults, ids)
    assert check_label_gate(db, 1, 0.2) == (4, 1)  # 20 %: at the gate, trains on
    settings = loop.LoopSettings(generations=3, select=5, calculator="ase.calculators.emt:EMT")
    assert settings.labeller.max_failed_fraction == 0.05
    with pytest.raises(LabellingError, match=rf"generation 1: 1 of 5 labels failed \(20%, over max_failed_fraction "
                                             rf"0.05\): id={ids[0]}: InjectedFault"):
        loop._take(loop.LoopStep(LoopAction.TRAIN, 2, parent=1), local_site(tmp_path), db, tiny_train_config(),
                   settings, 60, print)
    assert db.records() == []  # nothing claimed or submitted


@pytest.mark.slurm
def test_gpaw_labels_al_cells_through_a_slurm_job_array_as_a_direct_gpaw_run(tmp_path):
    """3 rattled 4-atom Al cells, PBE, PW 200 eV, Gamma point (about 2 s each), 2 array tasks."""
    if not gpaw_available():
        pytest.skip("gpaw is not installed (pip install -e .[dft], see README)")
    from tests.helpers import ci_site

    site = ci_site(tmp_path, label={"partition": "cpu", "cpus": 1, "mem_gb": 1, "time_minutes": 10})
    db = DatabaseManager(site.database)
    cells = al_cells(3)
    ids = [db.add_candidate(a, "al") for a in cells]
    db.update_rows([(i, {"status": "DFT_REQUESTED", "selected_by_generation": 1}) for i in ids])
    labeller = gpaw_labeller(structures_per_task=2, setup=["export OMP_NUM_THREADS=1"])
    summary = run_labels(site, db, labeller, timeout_s=300)
    assert summary.labelled == ids and summary.tasks == 2 and not summary.failed
    jobs = LabelFolder(summary.folder).jobs()
    assert [j.job_id.split("_")[1] for j in jobs] == ["0", "1"]  # one array, two tasks
    assert "export OMP_NUM_THREADS=1" in LabelFolder(summary.folder).job_script().read_text()
    for row_id, atoms in zip(ids, cells):
        row = db.get_row(row_id)
        atoms.calc = labeller.make_calculator()
        assert row.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        assert np.allclose(row.forces, atoms.get_forces(), atol=1e-5)
        assert (row.labeller, row.labeller_code, row.labeller_hash) == (labeller.name, "gpaw", labeller.settings_hash)
        assert row.labeller_version and row.status == "TRAINING_READY"


@pytest.mark.slurm
def test_scancel_of_the_label_array_loses_no_row_and_labels_none_twice(tmp_path):
    import subprocess
    import time

    from autopipec_hpc.active.label_array import submit_labels, wait_for_labels
    from tests.helpers import ci_site

    site = ci_site(tmp_path, label={"partition": "cpu", "cpus": 1, "mem_gb": 0.5, "time_minutes": 5})
    ids = requested(site.database, 4)
    db = DatabaseManager(site.database)
    slow = LabellerConfig(name="emt", calculator=FAULTS, structures_per_task=2,
                          kwargs={"slow_rows": [ids[1], ids[3]], "sleep_s": 120})
    sub = submit_labels(site, db, slow)
    deadline = time.monotonic() + 120
    mid = ["TRAINING_READY", "LABELLING"] * 2  # both tasks labelled their first row and sleep in their second
    while statuses(site.database, ids) != mid and time.monotonic() < deadline:
        time.sleep(0.2)
    assert statuses(site.database, ids) == mid
    subprocess.run(["scancel", sub.jobs[0].job_id.split("_")[0]], check=True)
    summary = wait_for_labels(site, db, sub.folder.path, timeout_s=120, poll_s=0.5)
    assert summary.labelled == [ids[0], ids[2]] and summary.returned == [ids[1], ids[3]], (
        summary, [dict(DatabaseManager(site.database).get_row(i).key_value_pairs) for i in ids])
    assert statuses(site.database, ids) == ["TRAINING_READY", "DFT_REQUESTED"] * 2
    first = {i: db.get_row(i).mtime for i in (ids[0], ids[2])}
    again = run_labels(site, db, LabellerConfig(name="emt", calculator=FAULTS), timeout_s=120)
    assert again.labelled == [ids[1], ids[3]] and statuses(site.database, ids) == ["TRAINING_READY"] * 4
    assert {i: db.get_row(i).mtime for i in (ids[0], ids[2])} == first  # none labelled twice


def test_label_no_wait_returns_with_the_array_in_flight_and_the_template_command_prints_a_labeller(tmp_path, capsys):
    from autopipec_hpc.active.label_array import wait_for_labels

    database = str(tmp_path / "s.db")
    ids = requested(database, 2)
    assert main(["labeller-template"]) == 0
    path = tmp_path / "labeller.yaml"
    path.write_text(capsys.readouterr().out)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(local_site(tmp_path).model_dump(mode="json")))
    assert main(["label", "--site", str(site), "--db", database, "--labeller", str(path), "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "label array submitted: 1 tasks" in out and "summary.json" in out
    folder = tmp_path / "labels" / "gen-1"
    summary = wait_for_labels(local_site(tmp_path), DatabaseManager(database), folder, timeout_s=120)
    assert summary.labelled == ids and (folder / "summary.json").exists()
    assert main(["label", "--site", str(site), "--db", database, "--labeller", str(path)]) == 0
    assert "nothing to label" in capsys.readouterr().out
