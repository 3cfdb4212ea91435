"""Faults on the local executor, with real processes: simultaneous submits, jobs
killed with SIGKILL, a database locked while a job writes, folders that cannot be
written. Each ends in the true state, in bounded time, with nobody running --wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import DatabaseError, PreflightError
from autopipec_hpc.example_data import tiny_train_config
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.registry import potentials_root
from autopipec_hpc.run_folder import RunFolder
from autopipec_hpc.scheduler.base import SubmittedJobs
from autopipec_hpc.generation import cancel_generation, wait_for_generation
from autopipec_hpc.submission import submit_generation
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker
from tests.helpers import CLI, postgres_database, run_cli


def _site_file(tmp_path: Path, site) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps(site.model_dump(mode="json")))
    return path


def _status_until(tmp_path: Path, site_file: Path, generation: int, wanted: set[str], timeout_s: float = 60):
    """`status` from new processes until the record is one of ``wanted``."""
    db = DatabaseManager(json.loads(site_file.read_text())["database"])
    deadline = time.monotonic() + timeout_s
    while True:
        done = run_cli("status", "--site", str(site_file), "--generation", str(generation), cwd=tmp_path, timeout=120)
        record = db.get_record(generation)
        if record.status in wanted or time.monotonic() > deadline:
            return done, record
        time.sleep(1)


@pytest.mark.pacemaker
def test_simultaneous_submits_of_one_generation_one_proceeds(tmp_path, example_db, local_site):
    site = local_site(str(make_fault_pacemaker(tmp_path, "hang")))
    site_file = _site_file(tmp_path, site)
    procs = [subprocess.Popen(CLI + ["submit", "--site", str(site_file), "--generation", "7"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    # Listed before the checks, so that the cleanup below has them whichever check fails
    # (listed inside, a failing first check ended in an UnboundLocalError that hid it).
    runs = sorted((tmp_path / "runs").glob("gen-0007*"))
    try:
        assert sorted(rc for rc, _, _ in outcomes) == [0, 2, 2, 2], outcomes
        for rc, _, err in outcomes:
            if rc == 2:
                assert err.count("\n") == 1 and ("generation 7 is SUBMITTED" in err or "generation 7 is RUNNING" in err)
        assert len(runs) == 1  # the losers made no run folder
        record = DatabaseManager(example_db).get_record(7)
        assert record.status.is_active and record.run_dir == runs[0]
    finally:
        for run in runs:
            if RunFolder(run).jobs_file.exists():  # what was submitted: the rest has nothing to cancel
                cancel_generation(run)


@pytest.mark.pacemaker
def test_simultaneous_plain_submits_get_distinct_generations(tmp_path, example_db, local_site):
    site = local_site(str(make_fault_pacemaker(tmp_path, "crash")))
    site_file = _site_file(tmp_path, site)
    procs = [subprocess.Popen(CLI + ["submit", "--site", str(site_file)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    records = DatabaseManager(example_db).records()
    assert [r.generation for r in records] == [1, 2, 3]
    assert len({r.run_dir for r in records}) == 3


def _training_that_hangs(tmp_path: Path, example_db: str, local_site):
    """A generation submitted with the hanging fault injector, once its fit has started."""
    site = local_site(str(make_fault_pacemaker(tmp_path, "hang")))
    sub = submit_generation(example_db, site, tiny_train_config())
    folder = RunFolder(sub.spec.run_dir)
    deadline = time.monotonic() + 60
    while not (folder.path / "attempt-1" / "grandchild.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return site, sub, folder


def _end(locker: subprocess.Popen) -> None:
    """Let the process holding the lock finish its hold; kill it if it overstays."""
    try:
        locker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        locker.kill()
        locker.wait()


def _processes_of(submitit_dir: Path) -> list[int]:
    """Live processes whose command line names ``submitit_dir`` (submitit's job bodies)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(submitit_dir) in cmdline and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


@pytest.mark.pacemaker
@pytest.mark.parametrize("victims", [("train",), ("train", "evaluate")])
def test_jobs_killed_with_sigkill_end_failed_without_anyone_waiting(tmp_path, example_db, local_site, victims):
    site, sub, folder = _training_that_hangs(tmp_path, example_db, local_site)
    jobs = SubmittedJobs.load(folder.path)
    for which in victims:
        os.kill(int(jobs.by_role(which).job_id), signal.SIGKILL)
    done, record = _status_until(tmp_path, _site_file(tmp_path, site), 1, {"FAILED"})
    assert record.status == RecordState.FAILED, (record, done.stdout)
    assert "FAILED" in done.stdout
    assert any(word in record.reason for word in ("ended without", "training job")), record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()
    # The job bodies and pacemaker died with their controllers; nothing trains on unseen.
    # (The fault injector's own `sleep` grandchild is not ours to end: a real pacemaker has none.)
    os.kill(int((folder.path / "attempt-1" / "grandchild.pid").read_text()), signal.SIGKILL)
    pacemaker_pid = int((folder.path / "attempt-1" / "pacemaker.pid").read_text())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (pid_alive(pacemaker_pid) or _processes_of(folder.submitit_dir)):
        time.sleep(0.2)
    assert not pid_alive(pacemaker_pid), "pacemaker outlived its killed job"
    assert not _processes_of(folder.submitit_dir), "job bodies outlived their killed controllers"
    # the generation is not blocked: it can be claimed again at once
    again = submit_generation(example_db, local_site(str(make_fault_pacemaker(tmp_path, "crash"))),
                              tiny_train_config(), generation=1)
    assert again.spec.generation == 1 and again.spec.run_dir != sub.spec.run_dir


@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_database_locked_when_a_job_writes_is_waited_out(tmp_path, example_db, local_site):
    """Another process holds the SQLite file's lock for 45 s from the moment pacemaker
    starts, so the jobs' writes at the end of training and at publication meet it for
    longer than one ASE write waits (20 s): they retry, and the generation still ends
    SUCCEEDED and published."""
    site = local_site()
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)\n"
         "while not __import__('os').path.exists(sys.argv[2]): time.sleep(0.05)\n"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(45); c.execute('COMMIT')\n",
         example_db, str(tmp_path / "runs" / "gen-0001" / "attempt-1")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        sub = submit_generation(example_db, site, tiny_train_config())
    except Exception:
        locker.kill()
        raise
    assert locker.stdout.readline().strip() == "locked"
    record = wait_for_generation(Path(sub.spec.run_dir), timeout_s=600)
    locker.wait(timeout=120)
    assert record.status == RecordState.SUCCEEDED
    assert (potentials_root(site.output_dir) / "1" / "potential.yaml").exists()


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_submitting(tmp_path, example_db, local_site, kind):
    site = local_site()
    out = Path(site.output_dir)
    _mount_tmpfs(out, "ro,size=1m" if kind == "read-only" else "size=32k")
    try:
        if kind == "full":
            (out / "potentials").mkdir()
            (out / "filler").write_bytes(b"\0" * 30_000)
        with pytest.raises(PreflightError, match="output folder writable"):
            submit_generation(example_db, site, tiny_train_config())
        record = DatabaseManager(example_db).get_record(1)
        assert record.status == RecordState.FAILED and "not submitted" in record.reason
        assert not RunFolder(record.run_dir).jobs_file.exists()  # nothing was queued
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# Waits until ``pattern`` (a glob) exists, then locks the whole database for ``hold`` s:
# SQLite with an exclusive transaction (readers too are shut out), PostgreSQL with an
# ACCESS EXCLUSIVE lock on ase's ``systems`` table (every read and write needs it).
_LOCKER = """
import glob, sys, time
target, pattern, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + 600
while not glob.glob(pattern):
    if time.monotonic() > deadline:
        sys.exit(f'{pattern} never appeared')
    time.sleep(0.02)
if '://' in target:
    import psycopg2
    connection = psycopg2.connect(target)
    connection.cursor().execute('LOCK TABLE systems IN ACCESS EXCLUSIVE MODE')
else:
    import sqlite3
    connection = sqlite3.connect(target, timeout=60, isolation_level=None)
    connection.execute('BEGIN EXCLUSIVE')
print('locked', flush=True)
time.sleep(hold)
connection.commit() if '://' in target else connection.execute('COMMIT')
print('released', flush=True)
"""
# Where each step a job writes begins: the lock lands just before that write.
_LOCK_WHEN = {
    # jobs.json is written when both jobs were started, before the training job's
    # RUNNING (and before `submit` adds the job ids to the record: it waits too)
    "training start": "runs/gen-0001*/jobs.json",
    # the evaluation's staging folder: evaluation, then publication and SUCCEEDED
    "publication": "output/potentials/.staging-1-*",
}


@pytest.mark.pacemaker
@pytest.mark.slow
# Each step on one backend and each backend at one step (every pair took ~2 min of CI's
# 90: a held lock is waited out in real time); the other pairs ran before 2026-12-07.
@pytest.mark.parametrize("step,backend", [("training start", "postgresql"), ("publication", "sqlite")])
def test_a_database_locked_at_a_step_where_a_job_writes_is_waited_out(tmp_path, local_site, step, backend):
    """Another process locks the database for 30 s (SQLite: longer than one ASE write
    waits, 20 s) just before a job writes: the job waits it out (bounded retry), and the
    generation ends SUCCEEDED with its potential published exactly once."""
    from autopipec_hpc.example_data import write_example_database

    database = str(tmp_path / "structures.db") if backend == "sqlite" else postgres_database()
    write_example_database(DatabaseManager(database))
    site = local_site().model_copy(update={"database": database})
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, database, str(tmp_path / _LOCK_WHEN[step]), "30"],
                              stdout=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        sub = submit_generation(database, site, tiny_train_config())
        assert locker.stdout.readline().strip() == "locked"
        seen = set()
        while time.monotonic() - start < 300:
            try:
                record = DatabaseManager(database).get_record(1)
            except DatabaseError:  # the reader too finds it locked
                continue
            seen.add(str(record.status))
            if record.status.is_final:
                break
            time.sleep(0.5)
    finally:
        _end(locker)
    print(f"{step} locked ({backend}): {record.status} after {time.monotonic() - start:.0f} s, seen {sorted(seen)}")
    assert record.status == RecordState.SUCCEEDED, record
    assert "FAILED" not in seen
    assert record.train_job == sub.jobs.train.job_id  # `submit` recorded the job ids despite the lock
    published = sorted(p.name for p in potentials_root(site.output_dir).iterdir())
    assert published == ["1"], published  # once, and no staging folder left behind
    if backend == "sqlite":
        logs = "".join(p.read_text(errors="replace") for p in Path(sub.spec.run_dir).glob("submitit/*.err"))
        assert "database busy" in logs, logs[-2000:]


@pytest.mark.pacemaker
def test_a_publication_that_never_got_its_succeeded_record_is_taken_back(tmp_path, example_db, local_site):
    """The evaluation job killed between publishing and writing SUCCEEDED (a window of
    milliseconds in publish_and_record, so the folder it had published is made here by
    hand): the reconciliation that records FAILED takes the publication back, so the
    record and the published folders never disagree."""
    site, sub, folder = _training_that_hangs(tmp_path, example_db, local_site)
    published = potentials_root(site.output_dir) / "1"
    published.mkdir(parents=True)
    (published / "metrics.json").write_text(json.dumps({"attempt": str(folder.path / "attempt-1")}))
    jobs = SubmittedJobs.load(folder.path)
    for job in (jobs.evaluate, jobs.train):  # each job's controller and the job body under it
        for pid in [int(job.job_id), *_children(int(job.job_id))]:
            os.kill(pid, signal.SIGKILL)
    for name in ("pacemaker.pid", "grandchild.pid"):  # what the killed job body leaves running
        try:
            os.kill(int((folder.path / "attempt-1" / name).read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    done, record = _status_until(tmp_path, _site_file(tmp_path, site), 1, {"FAILED"})
    assert record.status == RecordState.FAILED and "taken back" in record.reason, (record, done.stdout)
    assert not published.exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_database_locked_when_a_failing_training_ends_is_waited_out(tmp_path, example_db, local_site):
    """The training end's write (here FAILED: a successful training writes only its
    verdict file) meets a SQLite database locked for 30 s: it waits, and the record
    ends FAILED with pacemaker's reason, nothing published."""
    site = local_site(str(make_fault_pacemaker(tmp_path, "crash")))
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, example_db, str(tmp_path / "runs/gen-0001*/attempt-1"),
                               "30"], stdout=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        sub = submit_generation(example_db, site, tiny_train_config())
        assert locker.stdout.readline().strip() == "locked"
        done, record = _status_until(tmp_path, _site_file(tmp_path, site), 1, {"FAILED"}, timeout_s=180)
    finally:
        _end(locker)
    print(f"training end locked: {record.status} after {time.monotonic() - start:.0f} s")
    assert record.status == RecordState.FAILED and "exited with code 1" in record.reason, (record, done.stdout)
    logs = "".join(p.read_text(errors="replace") for p in Path(sub.spec.run_dir).glob("submitit/*.err"))
    assert "writing FAILED: database busy" in logs, logs[-2000:]
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.pacemaker
def test_a_database_gone_while_a_job_runs_is_not_made_anew_by_the_job(tmp_path, example_db, local_site):
    """The database moved away (or a compute node without its folder mounted): the job ends
    without making an empty database in its place, and its record is put right once the
    database is back."""
    site, sub, folder = _training_that_hangs(tmp_path, example_db, local_site)
    moved = Path(f"{example_db}.moved")
    os.rename(example_db, moved)
    for name in ("grandchild.pid", "pacemaker.pid"):  # the fit ends: the job writes its record
        os.kill(int((folder.path / "attempt-1" / name).read_text()), signal.SIGKILL)
    jobs = SubmittedJobs.load(folder.path)
    deadline = time.monotonic() + 60
    while any(pid_alive(int(job.job_id)) for job in (jobs.train, jobs.evaluate)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(int(job.job_id)) for job in (jobs.train, jobs.evaluate))
    assert not Path(example_db).exists()
    logs = "".join(p.read_text(errors="replace") for p in (folder.path / "submitit").glob("*.err"))
    assert "does not exist" in logs, logs[-2000:]
    os.rename(moved, example_db)
    done, record = _status_until(tmp_path, _site_file(tmp_path, site), 1, {"FAILED"})
    assert record.status == RecordState.FAILED, (record, done.stdout)
    assert not (potentials_root(site.output_dir) / "1").exists()
