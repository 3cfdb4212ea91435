"""Selections and labels are claimed (issue 19, section 6), and the selection's budget and
baseline (4b): one selection per generation at a time, decided under the records' lock; a
row labelled once however many labellers run; a claim whose holder died recovered, never
stuck; ``--strategy random`` uniform among every scorable candidate; atoms reported and
budgeted.

The fast tests race real threads (and real processes for labelling) through the real code
path with a stand-in scorer (gamma = cell volume, no pyace); the ``trained`` ones use a tiny
real potential, real processes and the local executor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from autopipec_hpc.active import labelling, select_job, selection
from autopipec_hpc.active.selection_folder import SelectionRequest
from autopipec_hpc.cli import main
from autopipec_hpc.errors import ClaimError, ConfigError, LabellingError
from autopipec_hpc.states import LoopAction, StructureStatus
from autopipec_hpc.store import DatabaseManager
from tests.helpers import CLI, copy_db, far_candidates, near_candidates, tiny_site


class _SlowScorer:
    """pyace's stand-in: gamma is the cell volume per atom, after a pause per structure, so two
    selections started together are scoring at the same time."""

    pause_s = 0.05

    def __init__(self, folder) -> None:
        self.elements = {"Cu"}

    def unknown(self, atoms):
        return sorted(set(atoms.get_chemical_symbols()) - self.elements)

    def gamma(self, atoms):
        time.sleep(self.pause_s)
        return np.full(len(atoms), atoms.get_volume() / len(atoms))

    def check(self, atoms):
        from autopipec_hpc.active.gamma import basic_problem

        return None, basic_problem(atoms)

    def gammas(self, batch, environments=None):  # the batched interface (active/gamma.py)
        return [self.gamma(atoms) for atoms in batch]


@pytest.fixture
def fake_select(tmp_path, monkeypatch):
    """A database of 12 candidates of three sizes (4, 8 and 32 atoms) and a stand-in scorer."""
    monkeypatch.setattr(selection, "GammaScorer", _SlowScorer)
    potential = lambda db, generation: tmp_path / "output" / "potentials" / "1"  # noqa: E731
    monkeypatch.setattr(selection, "published_potential", potential)
    monkeypatch.setattr(select_job, "published_potential", potential)  # its own binding
    database = str(tmp_path / "s.db")
    db = DatabaseManager(database)
    rng = np.random.default_rng(3)
    for k in range(12):
        atoms = bulk("Cu", "fcc", a=3.61 * rng.uniform(0.95, 1.1), cubic=True)
        atoms = atoms.repeat((1, 1, 1) if k % 3 == 0 else (2, 1, 1) if k % 3 == 1 else (2, 2, 2))
        db.add_candidate(atoms, f"size{len(atoms)}")
    return database


def _race(n: int, target) -> list:
    """``target(k)`` in ``n`` threads released together; each one's result or exception."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(k):
        barrier.wait()
        try:
            out[k] = target(k)
        except BaseException as exc:  # noqa: BLE001 - the race's loser is what is tested
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.parametrize("strategies", [("top-gamma", "top-gamma"), ("random", "random")])
def test_two_selections_at_once_request_one_budget(fake_select, tmp_path, strategies):
    """Two `select --max 3` at once (or two random ones with different seeds): 3 rows in all,
    one marker; the other is refused by name (in flight, or already selected)."""

    def select(k):
        request = SelectionRequest(1, max_select=3, gamma_min=0.0, strategy=strategies[k], seed=k,
                                   out_dir=tmp_path / f"sel-{k}")
        return selection.select_candidates(DatabaseManager(fake_select), request)

    results = _race(2, select)
    won = [r for r in results if isinstance(r, selection.SelectionResult)]
    lost = [r for r in results if not isinstance(r, selection.SelectionResult)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], ClaimError), lost
    assert "generation 1 is being selected already" in str(lost[0]) or "already selected" in str(lost[0])
    db = DatabaseManager(fake_select)
    assert db.count(status=StructureStatus.DFT_REQUESTED) == 3
    assert len(db.markers("selection", 1)) == 1 and db.selection_claims() == []


def test_a_generation_selected_once_is_refused_then_selected_again_on_request(fake_select, tmp_path):
    db = DatabaseManager(fake_select)
    selection.select_candidates(db, SelectionRequest(1, max_select=2, gamma_min=0.0, out_dir=tmp_path / "a",
                                                     strategy="top-gamma"))
    with pytest.raises(ClaimError, match="generation 1 was already selected: 2 structures requested.*--again"):
        selection.select_candidates(db, SelectionRequest(1, max_select=2, gamma_min=0.0, out_dir=tmp_path / "b"))
    assert not (tmp_path / "b").exists() and db.count(status=StructureStatus.DFT_REQUESTED) == 2
    again = selection.select_candidates(db, SelectionRequest(1, max_select=2, gamma_min=0.0, strategy="top-gamma",
                                                             again=True, out_dir=tmp_path / "c"))
    assert len(again.selected_ids) == 2 and db.count(status=StructureStatus.DFT_REQUESTED) == 4


def test_a_claim_whose_process_died_is_dropped_and_a_live_one_refuses(fake_select, tmp_path):
    from autopipec_hpc.active.loop import next_step
    from autopipec_hpc.active.selection_claim import claim_selection

    db = DatabaseManager(fake_select)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = claim_selection(db, 1)
        db.update_selection_claim(claim.row_id, claimed_by=f"{os.uname().nodename}:{holder.pid}")
        with pytest.raises(ClaimError, match=f"being selected already \\(claimed by .*:{holder.pid}"):
            selection.select_candidates(db, SelectionRequest(1, max_select=2, out_dir=tmp_path / "x"))
        monkey_published(db)
        assert next_step(db, generations=3).action == LoopAction.WAIT_SELECTION
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone: the claim is dropped, never stuck
    assert next_step(db, generations=3).action == LoopAction.SELECT
    assert db.selection_claims() == []
    result = selection.select_candidates(db, SelectionRequest(1, max_select=2, gamma_min=0.0, strategy="top-gamma",
                                                              out_dir=tmp_path / "y"))
    assert len(result.selected_ids) == 2


def monkey_published(db: DatabaseManager) -> None:
    """Generation 1 SUCCEEDED in the records, as next_step wants to see it."""
    db.claim(1, lambda n: Path("/nonexistent/gen-0001"))
    db.update_record(1, "/nonexistent/gen-0001", "SUCCEEDED")


def test_a_claim_from_another_host_is_dropped_once_its_heartbeat_stops(fake_select):
    from autopipec_hpc.active import selection_claim

    db = DatabaseManager(fake_select)
    claim = selection_claim.claim_selection(db, 1)
    db.update_selection_claim(claim.row_id, claimed_by="elsewhere:123")
    assert selection_claim.live_claims(db, 1) != []
    db.update_selection_claim(claim.row_id, heartbeat=time.time() - selection_claim.HEARTBEAT_LEASE_S - 1)
    assert selection_claim.live_claims(db, 1) == [] and db.selection_claims() == []


def test_a_selection_that_fails_gives_its_claim_up(fake_select, tmp_path, monkeypatch):
    db = DatabaseManager(fake_select)

    def broken(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(selection, "_histogram", broken)
    with pytest.raises(RuntimeError):
        selection.select_candidates(db, SelectionRequest(1, max_select=2, strategy="top-gamma",
                                                         out_dir=tmp_path / "a"))
    assert db.selection_claims() == [] and db.count(status=StructureStatus.DFT_REQUESTED) == 0


# -- 4b: the random baseline, and atoms -------------------------------------------------------
def test_random_draws_uniformly_among_every_scorable_candidate(fake_select, tmp_path):
    """Not only those above --gamma-min: with gamma_min above every candidate's gamma, random
    still picks its budget, and over seeds every candidate is picked."""
    _SlowScorer.pause_s = 0.0
    try:
        db = DatabaseManager(fake_select)
        ids = [r.id for r in db.iter_rows(status="CANDIDATE")]
        picked = {i: 0 for i in ids}
        draws = []
        for seed in range(24):
            result = selection.select_candidates(db, SelectionRequest(
                1, max_select=3, gamma_min=1e6, strategy="random", seed=seed, again=True,
                out_dir=tmp_path / f"r{seed}"))
            assert result.above == 0 and len(result.selected_ids) == 3
            draws.append(tuple(result.selected_ids))
            for i in result.selected_ids:
                picked[i] += 1
            db.update_rows([(i, {"status": "CANDIDATE"}) for i in result.selected_ids])  # back in the pool
        assert min(picked.values()) >= 1, picked  # 24 x 3 draws of 12: each expected 6 times
        assert len(set(draws)) > 12  # seeds draw differently
        same = selection.select_candidates(db, SelectionRequest(1, max_select=3, gamma_min=1e6, strategy="random",
                                                                seed=5, again=True, out_dir=tmp_path / "again"))
        assert tuple(same.selected_ids) == draws[5]  # and a seed draws the same again
    finally:
        _SlowScorer.pause_s = 0.05


def test_an_atoms_budget_stops_the_selection_before_it_is_exceeded_and_atoms_are_reported(fake_select, tmp_path):
    db = DatabaseManager(fake_select)
    sizes = {r.id: r.natoms for r in db.iter_rows(status="CANDIDATE")}
    result = selection.select_candidates(db, SelectionRequest(1, max_select=10, gamma_min=0.0, strategy="top-gamma",
                                                              max_atoms=40, out_dir=tmp_path / "a"))
    ranked = sorted(sizes, key=lambda i: -db.get_row(i).gamma_max)
    taken, total = [], 0
    for i in ranked:  # the prefix by gamma that fits 40 atoms
        if total + sizes[i] > 40:
            break
        taken.append(i)
        total += sizes[i]
    assert sorted(taken) == result.selected_ids and 0 < result.selected_atoms == total <= 40
    assert len(result.selected_ids) < 10  # the atoms, not --max, stopped it
    assert sum(c.selected_atoms for c in result.by_config_type.values()) == total
    [marker] = db.markers("selection", 1)
    assert marker.n_selected_atoms == total and marker.max_atoms == 40
    saved = json.loads((tmp_path / "a" / "selection.json").read_text())
    assert saved["selected_atoms"] == total and saved["max_atoms"] == 40


def test_select_prints_the_atoms_to_label(fake_select, tmp_path, capsys):
    assert main(["select", "--db", fake_select, "--generation", "1", "--max", "4", "--gamma-min", "0",
                 "--strategy", "top-gamma", "--out", str(tmp_path / "s")]) == 0
    db = DatabaseManager(fake_select)
    atoms = sum(r.natoms for r in db.iter_rows(status="DFT_REQUESTED"))
    out = " ".join(capsys.readouterr().out.split())
    assert f"4 structures now DFT_REQUESTED ({atoms} atoms to label)" in out


@pytest.mark.parametrize("argv, culprit", [
    (["select", "--generation", "1", "--max-atoms", "0"], "--max-atoms"),
    (["loop", "--generations", "2", "--select", "2", "--calculator", "ase.calculators.emt:EMT",
      "--max-atoms", "-3"], "--max-atoms"),
])
def test_a_bad_atoms_budget_is_one_line_exit_2(tmp_path, capsys, argv, culprit):
    from autopipec_hpc.example_data import write_example_database

    database = tmp_path / "structures.db"
    write_example_database(DatabaseManager(database))
    assert main([*argv, "--db", str(database)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err, err


def test_the_loop_passes_its_seed_and_atoms_budget_to_each_selection():
    from autopipec_hpc.active.loop import LoopSettings

    settings = LoopSettings(generations=3, select=5, calculator="ase.calculators.emt:EMT", strategy="random",
                            seed=7, max_atoms=200)
    assert settings.selection(2) == SelectionRequest(2, max_select=5, strategy="random", seed=7, max_atoms=200)
    with pytest.raises(ConfigError, match="--max-atoms must be at least 1"):
        SelectionRequest(1, max_atoms=0)


# -- labels claimed ----------------------------------------------------------------------------
SLOW_CALCULATOR = '''
import glob, os, time
from ase.calculators.emt import EMT

class CountingEMT(EMT):
    """EMT that notes each structure it computes (pid, row positions) and takes its time; its
    first calculation waits (60 s at most) until both labellers have reached one, so that the
    two are computing at the same time."""
    def calculate(self, atoms=None, *args, **kwargs):
        with open(os.environ["LABEL_LOG"], "a") as log:
            log.write(f"{os.getpid()} {atoms.positions.sum():.10f}\\n")
        ready = os.environ["LABEL_LOG"] + f".ready-{os.getpid()}"
        if not os.path.exists(ready):
            open(ready, "w").close()
            deadline = time.time() + 60
            while len(glob.glob(os.environ["LABEL_LOG"] + ".ready-*")) < 2 and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(0.2)
        super().calculate(atoms, *args, **kwargs)
'''


def _requested(database: str, n: int) -> list[int]:
    db = DatabaseManager(database)
    ids = [db.add_candidate(a, "near") for a in near_candidates(n, seed=5)]
    db.update_rows([(i, {"status": "DFT_REQUESTED"}) for i in ids])
    return ids


def test_two_label_runs_at_once_compute_each_row_once(tmp_path):
    database = str(tmp_path / "s.db")
    ids = _requested(database, 6)
    (tmp_path / "slowcalc.py").write_text(SLOW_CALCULATOR)
    log = tmp_path / "calls.log"
    # This checkout's package first (an installed one may be another's), then the calculator.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "LABEL_LOG": str(log)}
    runs = [subprocess.Popen(CLI + ["label", "--db", database, "--calculator", "slowcalc:CountingEMT"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outs
    calls = log.read_text().split()
    structures = calls[1::2]
    assert len(structures) == len(set(structures)) == len(ids), calls  # each row computed once
    db = DatabaseManager(database)
    assert all(db.get_row(i).status == "TRAINING_READY" for i in ids)
    assert all("label_claimed_by" not in db.get_row(i) for i in ids)


def test_a_row_whose_labeller_was_killed_is_recovered_and_labelled(tmp_path):
    database = str(tmp_path / "s.db")
    ids = _requested(database, 2)
    db = DatabaseManager(database)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert db.claim_label(ids[0], f"{os.uname().nodename}:{dead.pid}")
    assert db.get_row(ids[0]).status == StructureStatus.LABELLING
    result = labelling.label_requested(db, labelling.Labeller.load("ase.calculators.emt:EMT"))
    assert sorted(result.labelled) == ids and result.atoms == sum(db.get_row(i).natoms for i in ids)
    assert all(db.get_row(i).status == "TRAINING_READY" for i in ids)


def test_a_row_another_live_labeller_holds_is_left_to_it(tmp_path):
    database = str(tmp_path / "s.db")
    ids = _requested(database, 2)
    db = DatabaseManager(database)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert db.claim_label(ids[0], f"{os.uname().nodename}:{holder.pid}")
        result = labelling.label_requested(db, labelling.Labeller.load("ase.calculators.emt:EMT"))
        assert result.labelled == [ids[1]] and db.get_row(ids[0]).status == StructureStatus.LABELLING
        with pytest.raises(LabellingError, match=f"id={ids[0]} are still being labelled"):
            labelling.label_requested(db, labelling.Labeller.load("ase.calculators.emt:EMT"), wait_s=0.5,
                                      poll_s=0.1)
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_label_keeps_the_row_requested_with_its_reason(tmp_path):
    from ase.calculators.emt import EMT

    database = str(tmp_path / "s.db")
    ids = _requested(database, 1)

    class Broken(EMT):
        def calculate(self, *a, **k):
            raise RuntimeError("SCF did not converge")

    with pytest.raises(LabellingError, match=f"id={ids[0]}"):
        labelling.label_requested(DatabaseManager(database), labelling.Labeller("x:Broken", Broken, {}))
    row = DatabaseManager(database).get_row(ids[0])
    assert row.status == "DFT_REQUESTED" and "SCF did not converge" in row.label_error
    assert "label_claimed_by" not in row
    labelling.label_requested(DatabaseManager(database), labelling.Labeller.load("ase.calculators.emt:EMT"))
    row = DatabaseManager(database).get_row(ids[0])
    assert row.status == "TRAINING_READY" and "label_error" not in row


def test_labeller_load_checks_the_calculator_once(monkeypatch):
    calls = []
    real = labelling.load_calculator_class
    monkeypatch.setattr(labelling, "load_calculator_class", lambda *a: calls.append(a) or real(*a))
    labelling.Labeller.load("ase.calculators.emt:EMT")
    assert len(calls) == 1


# -- with a real potential: processes, the local executor ----------------------------------------
@pytest.mark.slow
@pytest.mark.pacemaker
def test_two_select_processes_at_once_request_one_budget(trained, tmp_path):
    database = copy_db(trained, tmp_path)
    db = DatabaseManager(database)
    for k, a in enumerate(near_candidates(8) + far_candidates()):
        db.add_candidate(a, f"c{k}")
    runs = [subprocess.Popen(CLI + ["select", "--db", database, "--generation", "1", "--max", "3",
                                    "--gamma-min", "0", "--strategy", "random", "--seed", str(k),
                                    "--out", str(tmp_path / f"sel-{k}")],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], outs
    refused = next(err for run, (_, err) in zip(runs, outs) if run.returncode == 2)
    assert "generation 1 is being selected already" in refused or "generation 1 was already selected" in refused
    assert db.count(status="DFT_REQUESTED") == 3 and len(db.markers("selection", 1)) == 1


@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_loop_rerun_follows_the_select_job_in_flight_and_a_dead_one_is_recovered(trained, tmp_path, monkeypatch):
    """The loop died while its select job ran (here: the job is submitted, nobody waits):
    the rerun follows that job instead of submitting a second, and labels --select, not twice
    it. A select job killed outright leaves a claim the next step drops."""
    from autopipec_hpc.active import loop
    from autopipec_hpc.active.select_job import submit_selection
    from autopipec_hpc.example_data import tiny_train_config

    database = copy_db(trained, tmp_path)
    db = DatabaseManager(database)
    for k, a in enumerate(near_candidates(60, seed=2) + far_candidates()):
        db.add_candidate(a, f"c{k % 4}")
    site = tiny_site(tmp_path).model_copy(update={"database": database})

    # a select job killed outright: its claim is dropped, the step is SELECT again
    killed = submit_selection(site, db, SelectionRequest(1, max_select=3, gamma_min=0.0, out_dir=tmp_path / "k"))
    os.kill(int(killed.task.job_id), 9)
    deadline = time.monotonic() + 60
    while loop.next_step(db, 2, site=site).action != LoopAction.SELECT and time.monotonic() < deadline:
        time.sleep(0.5)
    assert db.selection_claims() == [] and db.count(status="DFT_REQUESTED") == 0

    sub = submit_selection(site, db, SelectionRequest(1, max_select=3, gamma_min=0.0, out_dir=tmp_path / "j"))
    assert loop.next_step(db, 2, site=site).action == LoopAction.WAIT_SELECTION

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # stop the rerun after its selection step

    monkeypatch.setattr(loop, "label_step", interrupted)
    said: list[str] = []
    settings = loop.LoopSettings(generations=2, select=3, calculator="ase.calculators.emt:EMT")
    with pytest.raises(KeyboardInterrupt):
        loop.run_loop(site, DatabaseManager(database), tiny_train_config(), settings, timeout_s=300,
                      notify=said.append)
    assert any("already in flight" in line for line in said), said
    [marker] = db.markers("selection", 1)
    assert marker.folder == str(sub.folder.path)
    assert db.count(status="DFT_REQUESTED") == 3
    assert not (tmp_path / "output" / "selections").exists()  # no second selection folder
