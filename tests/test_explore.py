"""Exploration: plans, the trajectory checks, the job array, the harvest and the loop that explores."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from autopipec_hpc.active.explore import Trajectory, run_trajectory, sanity_problem
from autopipec_hpc.active.explore_job import resolve_starts, supercell
from autopipec_hpc.active.explore_plan import ExplorePlan, plan_template
from autopipec_hpc.cli import main
from autopipec_hpc.errors import ExplorationError
from autopipec_hpc.example_data import write_example_database
from autopipec_hpc.states import StopReason, StructureStatus
from autopipec_hpc.store import DatabaseManager
from tests.helpers import copy_db, tiny_site

PLAN = {"ensembles": [{"ensemble": "nvt", "temperatures_K": [1500]}], "steps": 200, "check_every": 10}


def _bytes(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cell() -> Atoms:
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)


def displacement_grade(start: Atoms):
    """A stand-in for gamma that grows as the atoms leave their start (Angstrom): EMT MD
    then crosses any pair of trust levels on demand, which a real potential does not."""
    return lambda atoms: np.linalg.norm(atoms.positions - start.positions, axis=1)


class CollapsingPairFault(Calculator):
    """Fault injector: a deliberately bad potential that pulls atoms 0 and 1 together with a
    stiff spring (and nothing else), as a raw ACE fit without its ZBL core can at short range."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        bond = self.atoms.get_distance(0, 1, mic=True, vector=True)
        forces = np.zeros((len(self.atoms), 3))
        forces[0], forces[1] = 20.0 * bond, -20.0 * bond
        self.results = {"energy": 10.0 * float(bond @ bond), "forces": forces}


class KickingFault(Calculator):
    """Fault injector: random forces of 5 eV/A (a potential gone wrong heats the cell far
    beyond any thermostat), or NaN energies (``nan=True``, a broken evaluation)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.nan, self.rng = nan, np.random.default_rng(0)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float("nan") if self.nan else 0.0,
                        "forces": self.rng.normal(0.0, 5.0, (len(self.atoms), 3))}


# -- plans --------------------------------------------------------------------------------

def test_the_plan_template_runs_as_is_and_its_grid_numbers_the_trajectories():
    plan = ExplorePlan.model_validate(__import__("yaml").safe_load(plan_template()))
    assert plan.grid() == [("nvt", 300, None), ("nvt", 900, None), ("nvt", 1500, None),
                           ("npt", 600, 0), ("npt", 600, 10)]
    assert plan.gamma_lo < plan.gamma_hi


@pytest.mark.parametrize("text, culprit", [
    ("steps: 10\nensembles: [{ensemble: nvt, temperatures_K: [300]}]\nsurprise: 1\n", "unknown key 'surprise'"),
    ("steps: 10\ngamma_lo: 5\ngamma_hi: 5\nensembles: [{ensemble: nvt, temperatures_K: [300]}]\n", "gamma_hi"),
    ("steps: -3\nensembles: [{ensemble: nvt, temperatures_K: [300]}]\n", "'steps'"),
    ("steps: 10\nensembles: [{ensemble: nvt, temperatures_K: [.nan]}]\n", "temperatures_K"),
    ("steps: 10\nensembles: [{ensemble: npt, temperatures_K: [300]}]\n", "pressures_GPa"),
    ("steps: 10\nensembles: [{ensemble: nve, temperatures_K: [300]}]\n", "ensemble"),
])
def test_bad_plans_are_one_line_exit_2_nothing_written(tmp_path, capsys, text, culprit):
    database = tmp_path / "structures.db"
    write_example_database(DatabaseManager(database))
    before = _bytes(database)
    plan = tmp_path / "explore.yaml"
    plan.write_text(text)
    assert main(["explore", "--generation", "1", "--plan", str(plan), "--db", str(database)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err and "explore.yaml" in err, err
    assert _bytes(database) == before and not list(tmp_path.rglob("explorations"))


def test_a_config_type_that_matches_no_row_is_named(tmp_path):
    db = DatabaseManager(tmp_path / "structures.db")
    write_example_database(db)
    plan = ExplorePlan.model_validate({**PLAN, "starts": {"config_types": ["fcc_ev", "fcc_typo"]}})
    with pytest.raises(ExplorationError, match="'fcc_typo' matches no row"):
        resolve_starts(db, plan, {"Cu"})
    with pytest.raises(ExplorationError, match="holds Cu, which the potential does not know"):
        resolve_starts(db, ExplorePlan.model_validate(PLAN), {"Al"})
    starts = resolve_starts(db, ExplorePlan.model_validate({**PLAN, "starts": {"count": 5, "min_atoms": 30}}), {"Cu"})
    assert len(starts) == 5 and all(len(a) >= 30 for a in starts)


def test_supercells_grow_the_shortest_direction_to_the_minimum_size():
    assert len(supercell(bulk("Cu", "fcc", a=3.61, cubic=True), 32)) == 32
    primitive = supercell(bulk("Cu", "fcc", a=3.61), 32)  # 1 atom: 4x3x3, not 4x4x4
    assert len(primitive) == 36 and np.ptp(primitive.cell.lengths()) < 2.6
    slab = supercell(Atoms("Cu2", positions=[(0, 0, 0), (1.8, 1.8, 0)], cell=[3.6, 3.6, 20], pbc=[1, 1, 0]), 8)
    assert len(slab) == 8 and slab.cell.lengths()[2] == 20


# -- the trajectory checks ----------------------------------------------------------------

def test_gamma_hi_stops_a_trajectory_and_candidates_between_the_levels_are_capped():
    start = _cell()
    plan = ExplorePlan.model_validate({**PLAN, "gamma_lo": 0.1, "gamma_hi": 0.5, "max_frames": 2})
    result, frames = run_trajectory(start, EMT(), displacement_grade(start), plan, Trajectory(3, 0, "nvt", 1500.0))
    assert result.stop == StopReason.GAMMA_HI and result.beyond == 1 and result.steps < plan.steps
    assert result.candidates > 2 and result.kept == len(frames) == 2
    assert all(0.1 < f.info["explore_gamma_max"] < 0.5 and f.info["trajectory"] == 3 for f in frames)
    assert result.seen == result.accurate + result.candidates + result.beyond == len(result.gammas)
    calm = plan.model_copy(update={"gamma_hi": 50.0, "steps": 60})
    cool, _ = run_trajectory(start, EMT(), displacement_grade(start), calm, Trajectory(4, 0, "npt", 300.0, 5.0))
    assert cool.stop == StopReason.COMPLETED and cool.steps == calm.steps == cool.seen * calm.check_every


def test_a_collision_stops_the_trajectory_and_is_counted():
    plan = ExplorePlan.model_validate({**PLAN, "min_distance_A": 1.5})
    result, frames = run_trajectory(_cell(), CollapsingPairFault(), lambda a: np.zeros(len(a)), plan,
                                    Trajectory(0, 0, "nvt", 300.0))
    assert result.stop == StopReason.COLLISION and "apart" in result.stop_detail and not frames


@pytest.mark.parametrize("fault, reason", [(KickingFault(), StopReason.TEMPERATURE),
                                           (KickingFault(nan=True), StopReason.NAN)])
def test_a_temperature_blow_up_and_a_nan_stop_the_trajectory(fault, reason):
    plan = ExplorePlan.model_validate(PLAN)
    result, frames = run_trajectory(_cell(), fault, lambda a: np.zeros(len(a)), plan, Trajectory(0, 0, "nvt", 300.0))
    assert result.stop == reason and result.steps == plan.check_every and result.seen == 0 and not frames


def test_boxes_that_collapsed_or_skewed_are_not_physical():
    plan = ExplorePlan.model_validate(PLAN)
    squeezed = bulk("Cu", "fcc", a=2.5, cubic=True)
    assert sanity_problem(squeezed, plan)[0] == StopReason.BOX
    sheared = _cell()
    sheared.set_cell(sheared.cell[:] @ np.array([[1, 0, 0], [2.5, 1, 0], [0, 0, 1]]), scale_atoms=True)
    assert sanity_problem(sheared, plan)[0] == StopReason.BOX
    assert sanity_problem(_cell(), plan) is None


# -- with a real (tiny) published potential: the ``trained`` fixture (conftest) -----------------

def _plan_file(tmp_path: Path, **changes) -> Path:
    import yaml

    plan = {"starts": {"config_types": ["fcc_rattled"], "count": 2, "min_atoms": 32},
            "ensembles": [{"ensemble": "nvt", "temperatures_K": [600, 1500]}], "steps": 60, "check_every": 10,
            "gamma_lo": 1.5, "gamma_hi": 20.0, "max_frames": 2, "trajectories_per_task": 2, **changes}
    path = tmp_path / "explore.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow
@pytest.mark.pacemaker
def test_exploration_keeps_candidates_with_provenance_and_a_killed_task_is_redone_alone(trained, tmp_path, capsys):
    from autopipec_hpc.active.explore_job import finish_exploration, start_exploration
    from autopipec_hpc.scheduler.local import wait_until_final

    site = tiny_site(tmp_path).model_copy(update={"database": copy_db(trained, tmp_path)})
    db = DatabaseManager(site.database)
    bad = _plan_file(tmp_path, starts={"config_types": ["no_such_type"]})
    assert main(["explore", "--generation", "1", "--plan", str(bad), "--db", site.database]) == 2
    assert "'no_such_type' matches no row" in capsys.readouterr().err
    plan = ExplorePlan.from_yaml(_plan_file(tmp_path))
    run = start_exploration(site, db, plan, 1)
    assert run.submitted and len(run.tasks) == 2  # 4 trajectories, 2 per task
    os.kill(int(run.tasks[0].job_id), signal.SIGKILL)  # the local task's controller, before it wrote anything
    wait_until_final(run.tasks[0], 0.2)
    with pytest.raises(ExplorationError, match=f"task {run.tasks[0].job_id} \\(2 trajectories: 0, 1;"):
        finish_exploration(site, db, run.folder, 1, timeout_s=300)
    assert run.folder.done() == {2, 3} and not db.count(status=StructureStatus.CANDIDATE)
    again = start_exploration(site, db, plan, 1)
    assert again.submitted and len(again.tasks) == 1
    summary = finish_exploration(site, db, run.folder, 1, timeout_s=300)
    assert run.folder.done() == {0, 1, 2, 3} and summary.total.trajectories == 4
    rows = list(db.iter_rows(status=StructureStatus.CANDIDATE))
    assert len(rows) == summary.imported == summary.total.kept
    from autopipec_hpc.active.gamma import GammaScorer

    scorer = GammaScorer(Path(trained[2].potential_path))  # as select grades: the same numbers
    for row in rows:
        assert row.explored_by_generation == 1 and row.ensemble == "nvt" and row.temperature_K in (600, 1500)
        assert plan.gamma_lo < row.explore_gamma_max < plan.gamma_hi and row.md_step % 10 == 0
        assert scorer.gammas([row.toatoms()])[0].max() == pytest.approx(row.explore_gamma_max, rel=1e-3)
    [marker] = db.markers("exploration", 1)
    assert marker.n_seen == summary.total.seen and marker.accurate_share == round(summary.accurate_share, 6)
    assert run.folder.summary_file.exists() and run.folder.figure_file.exists()
    assert main(["explore", "--generation", "1", "--plan", str(_plan_file(tmp_path)), "--db", site.database]) == 2
    assert "explored already" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.pacemaker
def test_on_slurm_the_exploration_is_one_job_array_whose_tasks_sacct_lists(trained, tmp_path):
    from autopipec_hpc.active.explore_job import run_exploration
    from tests.helpers import ci_site, wait_state

    site = ci_site(tmp_path, database=copy_db(trained, tmp_path),
                   explore={"partition": "cpu", "cpus": 1, "mem_gb": 1, "time_minutes": 10})
    db = DatabaseManager(site.database)
    plan = ExplorePlan.from_yaml(_plan_file(tmp_path, steps=20))
    summary = run_exploration(site, db, plan, 1, timeout_s=600, poll_s=1.0)
    folder = Path(summary.folder)
    assert "#SBATCH --array=0-1" in (folder / "explore.sbatch").read_text()
    jobs = [j for rnd in __import__("json").loads((folder / "jobs.json").read_text()) for j in rnd]
    array = jobs[0]["job"]["job_id"].split("_")[0]
    assert [j["job"]["job_id"] for j in jobs] == [f"{array}_0", f"{array}_1"]
    for job in jobs:
        assert wait_state(job["job"]["job_id"], {"COMPLETED", "FAILED"}, 60, job["job"]["name"]) == "COMPLETED"
    assert summary.total.trajectories == 4 and db.markers("exploration", 1)


@pytest.mark.slow
@pytest.mark.pacemaker
def test_the_loop_with_a_plan_explores_selects_labels_trains_and_stops_by_its_rule(trained, tmp_path):
    from autopipec_hpc.active.loop import LoopSettings, next_step, run_loop
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.states import LoopAction

    site = tiny_site(tmp_path).model_copy(update={"database": copy_db(trained, tmp_path)})
    db = DatabaseManager(site.database)
    plan = _plan_file(tmp_path, gamma_lo=1.0)
    said: list[str] = []
    settings = LoopSettings(generations=2, select=3, calculator="ase.calculators.emt:EMT", plan=plan, converge=0.9999)
    # Generation 2 warm-starts from 1: a few iterations make it a published generation (the budget of CI time).
    config = tiny_train_config().model_copy(update={"maxiter": 5})
    steps = run_loop(site, db, config, settings, timeout_s=900, notify=said.append)
    assert [s.action for s in steps] == [LoopAction.EXPLORE, LoopAction.SELECT, LoopAction.LABEL, LoopAction.TRAIN]
    [selection] = db.markers("selection", 1)
    assert 1 <= selection.n_selected <= 3
    assert db.count(status=StructureStatus.TRAINING_READY) == 33 + selection.n_selected
    assert {r.get("explored_by_generation") for r in db.iter_rows(selected_by_generation=1)} == {1}
    # Resumed with one more generation and a rule its exploration meets: explore, then stop.
    settings = LoopSettings(generations=3, select=3, calculator="ase.calculators.emt:EMT", plan=plan, converge=1e-6)
    steps = run_loop(site, db, config, settings, timeout_s=900, notify=said.append)
    assert [s.action for s in steps] == [LoopAction.EXPLORE]
    final = next_step(db, 3, explore=True, converge=1e-6)
    assert final.action == LoopAction.ACCURATE and "--converge 1e-06" in final.describe()
    assert any("accurate enough" in line for line in said)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.pacemaker
def test_on_slurm_a_loop_generation_is_scheduler_work_from_exploration_to_evaluation(trained, tmp_path):
    """One generation of `loop --plan` on the CI cluster: the exploration is a job array on
    the cpu partition, the selection a job, the labels a job array (EMT), generation 2 a
    training job on the gpu partition and its evaluation after it; sacct lists every one as
    COMPLETED, and the records and rows say what the local loop's do."""
    import re

    from autopipec_hpc.active.loop import LoopSettings, run_loop
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.states import LoopAction, RecordState
    from tests.helpers import ci_site, wait_state

    cpu = {"partition": "cpu", "cpus": 1, "mem_gb": 1, "time_minutes": 10}
    site = ci_site(tmp_path, database=copy_db(trained, tmp_path), explore=cpu, select=cpu, label=cpu)
    db = DatabaseManager(site.database)
    settings = LoopSettings(generations=2, select=3, calculator="ase.calculators.emt:EMT",
                            plan=_plan_file(tmp_path, gamma_lo=1.0), converge=0.9999)
    said: list[str] = []
    steps = run_loop(site, db, tiny_train_config().model_copy(update={"maxiter": 5}), settings, timeout_s=900,
                     notify=said.append)
    assert [s.action for s in steps] == [LoopAction.EXPLORE, LoopAction.SELECT, LoopAction.LABEL, LoopAction.TRAIN]
    [selection] = db.markers("selection", 1)
    assert 1 <= selection.n_selected <= 3
    assert db.count(status=StructureStatus.TRAINING_READY) == 33 + selection.n_selected
    record = db.get_record(2)
    assert record.status == RecordState.SUCCEEDED and record.potential_path
    # The selection's folder is beside the potential it scored with (the fixture's output here),
    # the labels' beside the database.
    folders = [tmp_path, Path(selection.folder)]
    scripts = {path.name: path.read_text() for folder in folders for path in folder.rglob("*.sbatch")}
    assert "#SBATCH --partition=gpu" in scripts["train.sbatch"], sorted(scripts)
    for name in ("explore.sbatch", "select.sbatch", "label.sbatch", "evaluate.sbatch"):
        assert "#SBATCH --partition=cpu" in scripts.get(name, ""), (name, sorted(scripts))
    assert "#SBATCH --array=0-1" in scripts["explore.sbatch"]  # 4 trajectories, 2 per task
    ids = {job_id for folder in folders for path in folder.rglob("job*.json")
           for job_id in re.findall(r'"job_id": "(\d+(?:_\d+)?)"', path.read_text())}
    assert len(ids) >= 5, ids  # explore tasks, select, label tasks, train, evaluate
    for job_id in sorted(ids):
        assert wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED", job_id
    assert any("generation 2" in line for line in said), said


@pytest.mark.parametrize("extra, culprit", [
    (["--plan", "no_such_plan.yaml"], "no_such_plan.yaml: no such file"),
    (["--converge", "0.9"], "--converge"),
    (["--plan", "PLAN", "--converge", "1.5"], "--converge"),
])
def test_bad_loop_plans_are_one_line_exit_2_database_unchanged(tmp_path, capsys, extra, culprit):
    database = tmp_path / "structures.db"
    write_example_database(DatabaseManager(database))
    before = _bytes(database)
    plan = tmp_path / "explore.yaml"
    plan.write_text(plan_template())
    argv = ["loop", "--generations", "2", "--select", "2", "--calculator", "ase.calculators.emt:EMT",
            *[str(plan) if a == "PLAN" else a for a in extra], "--db", str(database)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err, err
    assert _bytes(database) == before
