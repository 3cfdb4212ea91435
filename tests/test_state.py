"""Records that stay true: atomic claims, forward-only updates by the run that holds
the claim, on SQLite and on PostgreSQL, with real concurrent processes."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import ClaimError, DatabaseError

# ``database`` (conftest.py): each test here runs on SQLite and on PostgreSQL.


def _claim(args: tuple[str, int | None, str, int]) -> tuple[str, int | None, str]:
    """In a separate process: claim ``generation`` for a run folder of our own."""
    target, generation, root, k = args
    db = DatabaseManager(target)
    try:
        number, run_dir = db.claim(generation, lambda g: _fresh(Path(root), g, k))
        return "won", number, str(run_dir)
    except ClaimError as exc:
        return "refused", generation, str(exc)


def _fresh(root: Path, generation: int, k: int) -> Path:
    path = root / f"gen-{generation:04d}-p{k}"
    path.mkdir(parents=True)
    return path


def _race(target: str, generation: int | None, root: Path, n: int = 6):
    DatabaseManager(target).count()  # create the tables before the race
    context = multiprocessing.get_context("spawn")
    with context.Pool(n) as pool:
        return pool.map(_claim, [(target, generation, str(root), k) for k in range(n)])


def test_of_simultaneous_claims_of_one_generation_exactly_one_wins(database, tmp_path):
    results = _race(database, 7, tmp_path)
    winners = [r for r in results if r[0] == "won"]
    assert len(winners) == 1, results
    assert all("generation 7 is SUBMITTED" in r[2] for r in results if r[0] == "refused")
    record = DatabaseManager(database).get_record(7)
    assert record.status == RecordState.SUBMITTED and str(record.run_dir) == winners[0][2]


def test_simultaneous_plain_claims_get_distinct_generations(database, tmp_path):
    results = _race(database, None, tmp_path)
    numbers = sorted(r[1] for r in results)
    assert all(r[0] == "won" for r in results) and numbers == list(range(1, 7))
    assert len({r[2] for r in results}) == 6  # a run folder belongs to exactly one claim
    assert [r.generation for r in DatabaseManager(database).records()] == list(range(1, 7))


def test_states_move_only_forward_and_only_for_the_owner(database, tmp_path):
    db = DatabaseManager(database)
    _, owner = db.claim(3, lambda g: _fresh(tmp_path, g, 0))
    assert db.update_record(3, owner, RecordState.RUNNING, values={"attempt": 1})
    assert db.update_record(3, owner, RecordState.SUBMITTED, reason="requeued")  # a requeue goes back
    assert db.update_record(3, owner, RecordState.RUNNING, values={"attempt": 2})
    assert not db.update_record(3, tmp_path / "someone-else", RecordState.FAILED, reason="a losing job")
    assert db.get_record(3).status == RecordState.RUNNING
    assert db.update_record(3, owner, RecordState.CANCELLED, reason="cancelled by user")
    for late in (RecordState.FAILED, RecordState.SUCCEEDED, RecordState.RUNNING, RecordState.SUBMITTED):
        assert not db.update_record(3, owner, late, reason="late")
    record = db.get_record(3)
    assert record.status == RecordState.CANCELLED and record.reason == "cancelled by user"


def test_a_new_claim_replaces_the_old_record_instead_of_merging_it(database, tmp_path):
    db = DatabaseManager(database)
    _, first = db.claim(2, lambda g: _fresh(tmp_path, g, 0))
    db.update_record(2, first, RecordState.SUCCEEDED, values={"potential_path": "/old/pot", "test_energy_rmse_mev": 9.0})
    with pytest.raises(ClaimError, match="already succeeded"):
        db.claim(2, lambda g: _fresh(tmp_path, g, 1))
    _, second = db.claim(2, lambda g: _fresh(tmp_path, g, 2), force=True)
    assert db.update_record(2, second, RecordState.FAILED, reason="crashed")
    assert not db.update_record(2, first, RecordState.SUCCEEDED)  # the old run cannot come back
    record = db.get_record(2)
    assert record.status == RecordState.FAILED and record.run_dir == second
    assert record.potential_path is None and record.test_energy_rmse_mev is None  # nothing mixed in


def test_a_failed_generation_can_be_claimed_again_without_force(database, tmp_path):
    db = DatabaseManager(database)
    _, first = db.claim(4, lambda g: _fresh(tmp_path, g, 0))
    db.update_record(4, first, RecordState.FAILED, reason="node died")
    number, second = db.claim(4, lambda g: _fresh(tmp_path, g, 1))
    assert number == 4 and second != first and db.get_record(4).status == RecordState.SUBMITTED


def test_a_database_url_with_a_password_is_refused_without_showing_it():
    with pytest.raises(DatabaseError) as info:
        DatabaseManager("postgresql://autopipec:s3cret-pw@127.0.0.1:1/x")
    assert "s3cret-pw" not in str(info.value) and "PGPASSWORD" in str(info.value)


def test_a_record_lock_held_elsewhere_is_waited_for_then_named(tmp_path):
    target = str(tmp_path / "busy.db")
    DatabaseManager(target).count()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from autopipec_hpc.store import DatabaseManager\n"
         "db = DatabaseManager(sys.argv[1])\n"
         "with db.locked():\n    print('held', flush=True); time.sleep(30)\n", target],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(DatabaseError, match="records-lock"):
            with DatabaseManager(target).locked(timeout_s=1.0):
                pass
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    with DatabaseManager(target).locked(timeout_s=5.0):  # free again once its holder is gone
        pass


def _published(folder: Path, generation: int) -> Path:
    """A published potential's manifest (enough for the record to know it is still there)."""
    import json
    from dataclasses import asdict

    from autopipec_hpc.registry import MANIFEST, PotentialManifest

    folder.mkdir(parents=True)
    manifest = PotentialManifest(generation=generation, elements=["Cu"], zbl_inner=1.0, zbl_outer=2.0,
                                 reference_energies={"Cu": -3.0}, files=[], published_at=time.time())
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest)))
    return folder


@pytest.mark.parametrize("outcome", [RecordState.FAILED, RecordState.CANCELLED, RecordState.DIVERGED])
def test_a_retrain_that_fails_puts_the_published_record_back(database, tmp_path, outcome):
    # `submit --force` of a SUCCEEDED generation deleted its record at the claim: a retrain
    # that then failed left FAILED beside a potential that stayed published.
    db = DatabaseManager(database)
    _, first = db.claim(5, lambda g: _fresh(tmp_path, g, 0))
    pot = _published(tmp_path / "output" / "potentials" / "5", 5)
    assert db.update_record(5, first, RecordState.SUCCEEDED, values={"potential_path": pot, "test_energy_rmse_mev": 9.0},
                            data={"metrics": {"total": {"energy_rmse_mev": 9.0}}})
    _, second = db.claim(5, lambda g: _fresh(tmp_path, g, 1), force=True)
    during = db.get_record(5)
    assert during.status == RecordState.SUBMITTED and during.run_dir == second
    assert during.potential_path is None and during.test_energy_rmse_mev is None  # the new run's values only
    assert db.update_record(5, second, RecordState.RUNNING, values={"attempt": 1})
    assert db.update_record(5, second, outcome, reason="pacemaker crashed", data={"log_tail": "std::bad_alloc"})

    record = db.get_record(5)
    assert record.status == RecordState.SUCCEEDED and record.run_dir == first
    assert record.potential_path == pot and record.test_energy_rmse_mev == 9.0
    assert record.metrics == {"total": {"energy_rmse_mev": 9.0}} and "published" not in record.data
    assert str(second) in record.reason and "pacemaker crashed" in record.reason
    assert [r["status"] for r in record.data["retrains"]] == [outcome.value]
    # the retrain's own waiter still learns how its run ended
    view = db.run_record(5, second)
    assert view.status == outcome and view.reason == "pacemaker crashed" and view.log_tail == "std::bad_alloc"
    assert db.run_record(5, first).status == RecordState.SUCCEEDED
    for late in (RecordState.SUCCEEDED, RecordState.FAILED):  # the ended retrain cannot write it again
        assert not db.update_record(5, second, late)
    assert db.get_record(5).status == RecordState.SUCCEEDED and db.get_record(5).run_dir == first

    # a retrain that succeeds replaces the record, and nothing of the old one is left in it
    _, third = db.claim(5, lambda g: _fresh(tmp_path, g, 2), force=True)
    assert db.update_record(5, third, RecordState.SUCCEEDED, values={"potential_path": pot, "test_energy_rmse_mev": 7.0})
    record = db.get_record(5)
    assert record.run_dir == third and record.test_energy_rmse_mev == 7.0 and record.reason == ""
    assert "published" not in record.data and "retrains" not in record.data
