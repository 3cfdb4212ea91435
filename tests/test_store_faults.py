"""The store's faults seen from outside (issue 19, item 6): a writer killed mid-write,
a database locked, read-only or unreachable, candidate imports that lose or hold
too much, a `~` in a site's database, a SQLite file that is not an ASE database.
Each ends in one line naming the database (or file), in bounded time."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.errors import DatabaseBusyError, DatabaseError, ImportDataError
from autopipec_hpc.states import RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from tests.helpers import CLI

# Long enough for a cold interpreter on a loaded machine; a hang is a hang.
BOUND_S = 90


def _cli(cwd: Path, *argv: str, timeout: float = BOUND_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(CLI + list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "AUTOPIPEC_DEBUG": ""})
    except subprocess.TimeoutExpired:
        pytest.fail(f"`autopipec-hpc {' '.join(argv)}` still had not finished after {timeout} s (a hang)")


def _one_error_line(done: subprocess.CompletedProcess, culprit: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2, f"exit {done.returncode}\nstderr: {err}\nstdout: {done.stdout[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert culprit in lines[0], lines[0]
    return lines[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cu(a: float = 3.6, labelled: bool = True):
    atoms = bulk("Cu", "fcc", a=a, cubic=True)
    if labelled:
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((4, 3)))
    return atoms


def _small_db(path: Path | str) -> Path | str:
    """Two labelled rows, two candidates, one DFT_REQUESTED row, a selection marker."""
    db = DatabaseManager(path)
    for k in range(2):
        db.add_structure(_cu(3.6 + 0.01 * k), -1.0, np.zeros((4, 3)), "bulk")
    for k in range(2):
        db.add_candidate(_cu(3.65 + 0.01 * k, labelled=False), "md")
    db.add_structure(_cu(3.7, labelled=False), 0.0, np.zeros((4, 3)), "md", status=StructureStatus.DFT_REQUESTED)
    db.add_marker("selection", 1, values={"n_selected": 1})
    return path


# -- 1. a writer killed mid-write ----------------------------------------------------

_STORE_WRITES = """
import sys, numpy as np
from pathlib import Path
from ase.build import bulk
from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
db = DatabaseManager(sys.argv[1])
atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
row = db.add_structure(atoms, -1.0, np.zeros((4, 3)), "after")
cand = db.add_candidate(atoms, "md")
db.update_rows([(cand, {"gamma_max": 2.0})])
db.set_labels(cand, -1.0, np.zeros((4, 3)), "TRAINING_READY")
gen, run_dir = db.claim(None, lambda g: Path(sys.argv[2]) / f"gen-{g}")
assert db.update_record(gen, run_dir, RecordState.RUNNING)  # a running job's record write
print("done", db.count(), flush=True)
"""


def _store_writes(database: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", _STORE_WRITES, str(database), str(tmp_path)],
                              capture_output=True, text=True, timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"store writes into {database} still had not finished after {BOUND_S} s (a hang)")


def test_a_lock_file_left_by_a_dead_writer_stops_no_later_writer(tmp_path, cu_dft_path):
    """ASE's ``<db>.lock`` as a process killed inside ase.db's write leaves it (ASE's Lock
    makes it with O_EXCL and removes it only on release; it has no timeout)."""
    database = _small_db(tmp_path / "s.db")
    lock = Path(f"{database}.lock")
    lock.touch()
    done = _cli(tmp_path, "import", str(cu_dft_path), "--db", str(database))
    assert done.returncode == 0, done.stderr
    done = _store_writes(database, tmp_path)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
    assert DatabaseManager(database).count(status="TRAINING_READY") == 2 + 105 + 2


def test_a_writer_killed_with_sigkill_mid_write_leaves_the_database_usable(tmp_path):
    database = tmp_path / "s.db"
    DatabaseManager(database).count()
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, numpy as np\n"
         "from ase.build import bulk\n"
         "from autopipec_hpc.store import DatabaseManager\n"
         "db = DatabaseManager(sys.argv[1]); atoms = bulk('Cu', 'fcc', a=3.6, cubic=True)\n"
         "while True: db.add_structure(atoms, -1.0, np.zeros((4, 3)), 'loop')\n",
         str(database)])
    try:
        deadline = time.monotonic() + 60
        while DatabaseManager(database).count() < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    written = DatabaseManager(database).count()
    assert written >= 30
    # The project takes no lock that outlives its holder: SQLite's own locks die with it.
    assert not Path(f"{database}.lock").exists()
    done = _store_writes(database, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert DatabaseManager(database).count() >= written + 2
    assert sqlite3.connect(database).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_json_databases_are_refused_by_name(tmp_path):
    """A JSON database has no transactions (all-or-nothing imports) and no lock that dies
    with its holder: it is refused, not half supported."""
    with pytest.raises(DatabaseError, match=r"s\.json.*SQLite.*PostgreSQL"):
        DatabaseManager(tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


# -- 2. every public method inside the guard ------------------------------------------

def _calls(db: DatabaseManager) -> dict:
    """One call of each public method that reads or writes rows, on ``_small_db``'s rows."""
    return {
        "update_rows": lambda: db.update_rows([(3, {"gamma_max": 1.5})]),
        "set_labels": lambda: db.set_labels(5, -2.0, np.zeros((4, 3)), StructureStatus.TRAINING_READY),
        "get_row": lambda: db.get_row(1),
        "markers": lambda: db.markers("selection"),
        "commit_selection": lambda: db.commit_selection(1, [3], {"n_selected": 1}, {"selected_ids": [3]}),
        "add_marker": lambda: db.add_marker("selection", 2),
        "add_candidate": lambda: db.add_candidate(_cu(labelled=False), "md"),
        "add_structure": lambda: db.add_structure(_cu(), -1.0, np.zeros((4, 3)), "bulk"),
        "mark_used": lambda: db.mark_used(1, [1], [2]),
        "write_record": lambda: db.write_record(1, RecordState.SUBMITTED),
        "count": lambda: db.count(),
        "iter_rows": lambda: list(db.iter_rows()),
        "iter_structures": lambda: list(db.iter_structures()),
        "records": lambda: db.records(),
    }


READS = ("get_row", "markers", "count", "iter_rows", "iter_structures", "records")


def test_every_guarded_method_still_works_on_a_healthy_database(database):
    db = DatabaseManager(_small_db(database))
    for name, call in _calls(db).items():
        call()
    assert db.get_row(3).status == StructureStatus.DFT_REQUESTED  # commit_selection
    assert db.get_row(5).status == StructureStatus.TRAINING_READY  # set_labels
    assert db.count(record="selection") == 3 and db.get_record(1).status == RecordState.SUBMITTED


@pytest.fixture
def locked_database(tmp_path, monkeypatch):
    """``_small_db`` with another process holding ``BEGIN EXCLUSIVE`` on it (readers shut
    out too). ase.db waits 20 s for a lock; here 0.2 s, so that each call gives up soon."""
    from ase.db.sqlite import SQLite3Database

    database = _small_db(tmp_path / "s.db")
    db = DatabaseManager(database)
    monkeypatch.setattr(SQLite3Database, "_connect", lambda self: sqlite3.connect(self.filename, timeout=0.2))
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()\n",
         str(database)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    try:
        yield database, db
    finally:
        locker.stdin.close()
        locker.wait(timeout=30)


@pytest.mark.parametrize("method", sorted(_calls(None)))  # type: ignore[arg-type]
def test_a_locked_database_is_one_busy_error_from_every_method(locked_database, method):
    database, db = locked_database
    with pytest.raises(DatabaseBusyError, match=f"database {database} is locked"):
        _calls(db)[method]()


@contextmanager
def _read_only_folder(where: Path):
    """A folder whose files cannot be written: a tmpfs remounted read-only as root (where
    chmod stops nothing), else chmod 0555/0444."""
    where.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        def remount():
            gc.collect()  # ase.db leaves finished connections to the collector, the file open till then
            done = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"cannot remount {where} read-only ({done.stderr.strip()}): a file left open?")
        try:
            yield remount
        finally:
            gc.collect()
            # A file still open (a failed test's traceback holds its connection) makes a plain
            # umount fail: detach it lazily rather than leave a mount behind.
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
    else:
        def freeze():
            for path in where.iterdir():
                path.chmod(0o444)
            where.chmod(0o555)
        try:
            yield freeze
        finally:
            where.chmod(0o755)


@pytest.fixture
def read_only_database(tmp_path):
    with _read_only_folder(tmp_path / "ro") as freeze:
        database = _small_db(tmp_path / "ro" / "s.db")
        freeze()
        yield database


@pytest.mark.parametrize("method", sorted(_calls(None)))  # type: ignore[arg-type]
def test_a_read_only_database_is_read_and_every_write_is_one_error(read_only_database, method):
    db = DatabaseManager(read_only_database)
    before = _digest(read_only_database)
    if method in READS:
        _calls(db)[method]()  # reading a read-only database is fine
        return
    with pytest.raises(DatabaseError, match=f"database {read_only_database} cannot be written"):
        _calls(db)[method]()
    assert _digest(read_only_database) == before


def test_label_on_a_read_only_database_is_one_line_exit_2(read_only_database, tmp_path):
    before = _digest(read_only_database)
    done = _cli(tmp_path, "label", "--calculator", "ase.calculators.emt:EMT", "--db", str(read_only_database))
    _one_error_line(done, f"database {read_only_database} cannot be written")
    assert _digest(read_only_database) == before


UNREACHABLE = "postgresql://u@127.0.0.1:1/db"


@pytest.mark.parametrize("method", sorted(_calls(None)))  # type: ignore[arg-type]
def test_an_unreachable_postgresql_server_is_one_database_error(method):
    pytest.importorskip("psycopg2")
    with pytest.raises(DatabaseError, match="database postgresql://u@127.0.0.1:1/db: .*refused"):
        _calls(DatabaseManager(UNREACHABLE))[method]()


@pytest.mark.parametrize("argv", [["status"], ["results"], ["label", "--calculator", "ase.calculators.emt:EMT"],
                                  ["import", "x.extxyz"]], ids=lambda a: a[0])
def test_cli_against_an_unreachable_postgresql_server_is_one_line_exit_2(tmp_path, argv):
    pytest.importorskip("psycopg2")
    ase.io.write(tmp_path / "x.extxyz", _cu())
    _one_error_line(_cli(tmp_path, *argv, "--db", UNREACHABLE), "127.0.0.1:1")


# -- 3. import --status CANDIDATE -------------------------------------------------------

def test_candidates_that_carry_labels_are_refused_not_stripped(tmp_path):
    """A labelled frame offered as a CANDIDATE is either DFT data (dropping it wastes that
    DFT) or a model's prediction (keeping it as the row's labels would pass it off as DFT):
    only the user knows, so it is refused with the way on, and nothing is written."""
    src = tmp_path / "md.extxyz"
    ase.io.write(src, [_cu(labelled=False), _cu(3.62)])
    database = _small_db(tmp_path / "s.db")
    before = _digest(database)
    with pytest.raises(ImportDataError, match=r"md\.extxyz: frame 1 carries an energy.*--status TRAINING_READY"):
        DatabaseManager(database).import_files([src], status=StructureStatus.CANDIDATE)
    assert _digest(database) == before
    done = _cli(tmp_path, "import", str(src), "--db", str(database), "--status", "CANDIDATE")
    _one_error_line(done, "md.extxyz: frame 1")
    assert _digest(database) == before


def test_a_candidate_file_without_frames_among_several_is_named(tmp_path):
    good = tmp_path / "good.extxyz"
    ase.io.write(good, [_cu(labelled=False)] * 2)
    blank = tmp_path / "blank.extxyz"
    blank.write_text("\n\n")  # not empty, yet no frame
    db = DatabaseManager(tmp_path / "s.db")
    with pytest.raises(ImportDataError, match="blank.extxyz: holds no structures"):
        db.import_files([good, blank], status=StructureStatus.CANDIDATE)
    assert db.count() == 0


def _peak_import_bytes(tmp_path: Path, n: int) -> int:
    src = tmp_path / f"c{n}.extxyz"
    frame = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    with open(src, "w") as handle:
        for k in range(n):
            frame.info["md_step"] = k
            ase.io.write(handle, frame, format="extxyz")
    db = DatabaseManager(tmp_path / f"c{n}.db")
    db.count()
    tracemalloc.start()
    try:
        assert db.import_files([src], status=StructureStatus.CANDIDATE) == n
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # 2,500 frames under tracemalloc: ~15 s, the fast tier's slowest by far
def test_candidate_import_streams(tmp_path):
    """Peak Python memory of a candidate import does not grow with the file: 4x the frames,
    well under 2x the peak (holding every frame, it grew ~4x)."""
    small, large = _peak_import_bytes(tmp_path, 500), _peak_import_bytes(tmp_path, 2000)
    assert large < 2 * small, (small, large)


def test_candidates_keep_provenance_and_come_in_file_order(tmp_path):
    frames = []
    for k in range(3):
        atoms = _cu(3.6 + 0.01 * k, labelled=False)
        atoms.info.update(config_type="md_300K", md_step=10 * k)
        frames.append(atoms)
    ase.io.write(tmp_path / "a.extxyz", frames[:2])
    ase.io.write(tmp_path / "b.extxyz", frames[2:])
    db = DatabaseManager(tmp_path / "s.db")
    assert db.import_files([tmp_path / "a.extxyz", tmp_path / "b.extxyz"], status="CANDIDATE") == 3
    rows = list(db.iter_rows(status="CANDIDATE"))
    assert [(r.source, r.frame, r.md_step, r.config_type) for r in rows] == [
        ("a.extxyz", 0, 0, "md_300K"), ("a.extxyz", 1, 10, "md_300K"), ("b.extxyz", 0, 20, "md_300K")]
    assert all(r.get("energy") is None for r in rows)


# -- 4. a site's `database: ~/...` ---------------------------------------------------------

def test_a_site_database_under_home_is_expanded_and_a_url_left_alone(tmp_path):
    from autopipec_hpc.config import SiteConfig

    (tmp_path / "site.yaml").write_text("database: ~/s.db\n")
    assert SiteConfig.from_yaml(tmp_path / "site.yaml").database == str(Path.home() / "s.db")
    url = "postgresql://me@dbhost:5432/~structures"
    assert SiteConfig(database=url).database == url


# -- 5. a SQLite file that is not an ASE database ----------------------------------------

@pytest.fixture
def foreign_sqlite(tmp_path) -> Path:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE measurements (t REAL, value REAL)")
        connection.execute("INSERT INTO measurements VALUES (1.0, 2.0)")
    connection.close()
    return path


def test_a_sqlite_file_that_is_not_an_ase_database_is_refused_untouched(foreign_sqlite, tmp_path):
    before = _digest(foreign_sqlite)
    with pytest.raises(DatabaseError, match=f"database {foreign_sqlite} .*not an ASE database.*measurements"):
        DatabaseManager(foreign_sqlite, must_exist=True)
    src = tmp_path / "one.extxyz"
    ase.io.write(src, _cu())
    with pytest.raises(DatabaseError, match="not an ASE database"):
        DatabaseManager(foreign_sqlite).import_files([src])
    for argv in (["status"], ["prepare", "--out", str(tmp_path / "ds")], ["import", str(src)]):
        _one_error_line(_cli(tmp_path, *argv, "--db", str(foreign_sqlite)), f"{foreign_sqlite}")
    assert _digest(foreign_sqlite) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("other")) == ["other.db"]


def test_an_empty_file_is_not_read_as_a_database_and_is_left_empty(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(DatabaseError, match=f"database {path} is empty"):
        DatabaseManager(path, must_exist=True)
    assert path.stat().st_size == 0
    assert DatabaseManager(path).count() == 0  # a writer may start a database there


@pytest.mark.slow
@pytest.mark.pacemaker
def test_select_on_a_read_only_database_is_one_line_exit_2(trained, tmp_path):
    """`select` scores (reads) fine, then its first write meets the read-only file."""
    from autopipec_hpc.example_data import write_example_candidates
    from tests.helpers import copy_db

    with _read_only_folder(tmp_path / "ro") as freeze:
        database = Path(copy_db(trained, tmp_path / "ro"))
        write_example_candidates(DatabaseManager(database), size=10)
        freeze()
        before = _digest(database)
        done = _cli(tmp_path, "select", "--generation", "1", "--max", "2", "--db", str(database),
                    "--out", str(tmp_path / "sel"), timeout=300)
        _one_error_line(done, f"database {database} cannot be written")
        assert _digest(database) == before


# -- one transaction is one transaction ---------------------------------------------------
# ase.db commits inside an open connection every `commit_frequency` (5,000) calls, and its
# delete commits and VACUUMs; either split what the store writes as one step.

@pytest.fixture
def commits_every_20_calls(monkeypatch):
    """ase.db's own commit frequency, lowered from 5,000 so that a test reaches it fast."""
    from ase.db.sqlite import SQLite3Database

    monkeypatch.setattr(SQLite3Database.managed_connection.__wrapped__, "__defaults__", (20,))


def _full_disk_after(monkeypatch, calls: int) -> None:
    """ase.db's row writes fail from the ``calls``-th on, as on a disk that filled up."""
    from ase.db.sqlite import SQLite3Database

    real, count = SQLite3Database._write, [0]

    def write(self, *args, **kwargs):
        count[0] += 1
        if count[0] >= calls:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SQLite3Database, "_write", write)


def test_an_import_longer_than_ases_commit_frequency_is_still_all_or_nothing(
        tmp_path, monkeypatch, commits_every_20_calls):
    src = tmp_path / "many.extxyz"
    ase.io.write(src, [_cu(3.6 + 0.001 * k) for k in range(50)])
    database = DatabaseManager(tmp_path / "s.db")
    _full_disk_after(monkeypatch, 45)
    with pytest.raises(DatabaseError, match="No space left"):
        database.import_files([src])
    assert DatabaseManager(tmp_path / "s.db").count() == 0


def test_a_forced_claim_that_fails_to_write_keeps_the_record_it_replaces(tmp_path, monkeypatch):
    database = DatabaseManager(tmp_path / "s.db")
    number, run_dir = database.claim(1, lambda n: tmp_path / f"gen-{n}")
    database.update_record(1, run_dir, RecordState.SUCCEEDED, "published")
    _full_disk_after(monkeypatch, 1)
    with pytest.raises(DatabaseError, match="No space left"):
        database.claim(1, lambda n: tmp_path / f"gen-{n}-again", force=True)
    record = DatabaseManager(tmp_path / "s.db").get_record(1)
    assert record is not None and record.status == RecordState.SUCCEEDED


def test_a_selection_commit_that_fails_keeps_its_claim_and_changes_no_row(tmp_path, monkeypatch):
    database = DatabaseManager(tmp_path / "s.db")
    ids = [database.add_candidate(_cu(labelled=False), "bulk") for _ in range(3)]
    claim_row = database.write_selection_claim(1, {"claimed_by": "test"})
    _full_disk_after(monkeypatch, 1)
    with pytest.raises(DatabaseError, match="No space left"):
        database.commit_selection(1, ids[:2], values={"n_selected": 2}, data={}, claim_row=claim_row)
    after = DatabaseManager(tmp_path / "s.db")
    assert [row.id for row in after.selection_claims(1)] == [claim_row]
    assert after.count(status=StructureStatus.CANDIDATE) == 3


@pytest.mark.parametrize("command", [["submit"], ["submit", "--from-generation", "1"], ["select", "--generation", "1"],
                                     ["status"], ["results"], ["prepare", "--out", "out"]])
def test_a_command_that_needs_a_database_leaves_none_behind_when_it_is_missing(tmp_path, command):
    missing = tmp_path / "nowhere" / "s.db"
    done = _cli(tmp_path, *command, "--db", str(missing))
    _one_error_line(done, str(missing))
    assert not missing.exists() and not missing.parent.exists()
