"""Faults on the real CI cluster: jobs cancelled by hand, a requeue SLURM starts, a
partition that is down, accounting that cannot answer, and PostgreSQL as the
database of a whole SLURM run. Each ends in the true state with nobody running --wait."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.example_data import tiny_train_config, write_example_database
from autopipec_hpc.registry import potentials_root
from autopipec_hpc.generation import cancel_generation, wait_for_generation
from autopipec_hpc.submission import submit_generation
from tests.helpers import CLI, TOY_EVALUATOR, ci_site, postgres_database, wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.pacemaker]  # every test submits: preflight imports pyace


def _status(tmp_path: Path, site, generation: int, env: dict | None = None) -> subprocess.CompletedProcess:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(json.dumps(site.model_dump(mode="json")))
    return subprocess.run(CLI + ["status", "--site", str(site_file), "--generation", str(generation)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


def _first_iteration(run_dir: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(run_dir.glob("attempt-*/progress.json")) and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.slow
def test_scancel_of_the_evaluation_while_training_runs_ends_failed(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": TOY_EVALUATOR})
    sub = submit_generation(example_db, site, tiny_train_config())
    assert wait_state(sub.jobs.train.job_id, {"RUNNING"}) == "RUNNING"
    subprocess.run(["scancel", sub.jobs.evaluate.job_id], check=True, timeout=30)
    assert wait_state(sub.jobs.train.job_id, {"COMPLETED", "FAILED"}, timeout_s=300) == "COMPLETED"
    deadline = time.monotonic() + 60
    while True:
        done = _status(tmp_path, site, 1)
        record = DatabaseManager(example_db).get_record(1)
        if record.status.is_final or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert record.status == RecordState.FAILED, (record, done.stdout)
    assert f"evaluation job {sub.jobs.evaluate.job_id} CANCELLED" in record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.slow
def test_scancel_of_the_training_by_hand_ends_cancelled(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": 200}))
    _first_iteration(Path(sub.spec.run_dir))
    subprocess.run(["scancel", sub.jobs.train.job_id], check=True, timeout=30)
    assert wait_state(sub.jobs.train.job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout_s=120) == "CANCELLED"
    started = time.monotonic()
    while True:
        done = _status(tmp_path, site, 1)
        record = DatabaseManager(example_db).get_record(1)
        if record.status.is_final or time.monotonic() - started > 120:
            break
        time.sleep(1)
    assert record.status == RecordState.CANCELLED, (record, done.stdout)
    assert f"training job {sub.jobs.train.job_id} CANCELLED" in record.reason
    assert wait_state(sub.jobs.evaluate.job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout_s=60) == "CANCELLED"
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.slow
def test_a_requeue_started_by_slurm_is_never_a_failure(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": TOY_EVALUATOR})
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": 60}))
    run = Path(sub.spec.run_dir)
    _first_iteration(run)
    subprocess.run(["scontrol", "requeue", sub.jobs.train.job_id], check=True, timeout=30)
    seen = set()
    deadline = time.monotonic() + 900
    db = DatabaseManager(example_db)
    while time.monotonic() < deadline:
        _status(tmp_path, site, 1)  # what a user would run meanwhile: it reconciles
        record = db.get_record(1)
        seen.add(str(record.status))
        if record.status.is_final:
            break
        time.sleep(2)
    assert record.status == RecordState.SUCCEEDED, (record, seen)
    assert "FAILED" not in seen
    assert len(list(run.glob("attempt-*"))) >= 2  # the requeued job ran again


def test_a_partition_that_is_down_is_named_and_status_says_why_it_waits(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    subprocess.run(["scontrol", "update", "partitionname=gpu", "state=down"], check=True, timeout=30)
    try:
        said: list[str] = []
        sub = submit_generation(example_db, site, tiny_train_config(), notify=said.append)
        assert any("partition 'gpu' is down" in line for line in said), said
        assert wait_state(sub.jobs.train.job_id, {"PENDING"}) == "PENDING"
        time.sleep(3)  # let the scheduler give its reason
        out = _status(tmp_path, site, 1).stdout
        assert "PENDING (" in out, out
    finally:
        subprocess.run(["scontrol", "update", "partitionname=gpu", "state=up"], timeout=30)
    cancel_generation(Path(sub.spec.run_dir))
    assert DatabaseManager(example_db).get_record(1).status == RecordState.CANCELLED


def test_a_partition_that_does_not_exist_is_refused_before_submitting(tmp_path, example_db):
    from autopipec_hpc.errors import PreflightError

    site = ci_site(tmp_path, train={"partition": "nosuchpart"})
    with pytest.raises(PreflightError, match="nosuchpart"):
        submit_generation(example_db, site, tiny_train_config())


def test_status_shows_every_record_when_accounting_cannot_answer(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": TOY_EVALUATOR})
    sub = submit_generation(example_db, site, tiny_train_config())
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: slurmdbd: connection refused' >&2\nexit 1\n")
    (fake / "sacct").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    done = _status(tmp_path, site, 1, env=env)
    assert done.returncode == 0, done.stderr
    assert "unknown" in done.stdout and ("SUBMITTED" in done.stdout or "RUNNING" in done.stdout), done.stdout
    assert DatabaseManager(example_db).get_record(1).status.is_active  # not judged without the scheduler
    wait_for_generation(Path(sub.spec.run_dir), timeout_s=600)


@pytest.mark.slow
def test_a_whole_slurm_run_through_postgresql(tmp_path):
    url = postgres_database()
    write_example_database(DatabaseManager(url))
    site = ci_site(tmp_path, database=url, pacemaker={"evaluator": TOY_EVALUATOR})
    sub = submit_generation(url, site, tiny_train_config())
    record = wait_for_generation(Path(sub.spec.run_dir), timeout_s=900)
    assert record.status == RecordState.SUCCEEDED
    assert (potentials_root(site.output_dir) / "1" / "potential.yaml").exists()
    script = (Path(sub.spec.run_dir) / "train.sbatch").read_text()
    assert "PGPASSWORD" not in script and "password" not in script.lower()
    used = DatabaseManager(url).count(generation=1)
    assert used > 0  # the evaluation job marked the structures it trained on, in PostgreSQL


NODE = "ci-node"
SLURM_STATE = Path(os.environ.get("AUTOPIPEC_SLURM_DIR", "/tmp/autopipec-slurm"))


def _alone_on_the_cluster(*ours: str) -> None:
    """Only this test's jobs are queued: a node set down must not take anyone else's."""
    queued = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split())
    if queued - set(ours):
        pytest.skip(f"other jobs on the cluster ({sorted(queued - set(ours))}); not setting its node down")


def _until_final(tmp_path: Path, site, generation: int = 1, timeout_s: float = 600) -> tuple:
    """`status` from new processes (what a user runs; each reconciles) until the record is
    final: (the record, every state seen, seconds taken, the last status output)."""
    db = DatabaseManager(site.database)
    start = time.monotonic()
    seen: list[str] = []
    while True:
        done = _status(tmp_path, site, generation)
        record = db.get_record(generation)
        seen.append(str(record.status))
        if record.status.is_final or time.monotonic() - start > timeout_s:
            return record, seen, time.monotonic() - start, done.stdout
        time.sleep(2)


@pytest.mark.slow
def test_a_node_set_down_while_training_runs_is_a_requeue_and_ends_succeeded(tmp_path, example_db):
    """SLURM requeues the batch job of a node set DOWN (NODE_FAIL, then PENDING). This
    cluster's ReturnToService=2 brings the node back at once, so the requeued job is
    held a while (as if the node stayed down): meanwhile the record says SUBMITTED
    (requeued), never FAILED, and once released the requeued attempt resumes and the
    generation ends SUCCEEDED."""
    site = ci_site(tmp_path, pacemaker={"evaluator": TOY_EVALUATOR})
    # 150 iterations (~0.2 s each on tensorpot): the fit is still running when the node goes down
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": 150}))
    run = Path(sub.spec.run_dir)
    _first_iteration(run)
    _alone_on_the_cluster(sub.jobs.train.job_id, sub.jobs.evaluate.job_id)
    try:
        subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=down", "reason=autopipec-test"],
                       check=True, timeout=30)
        subprocess.run(["scontrol", "hold", sub.jobs.train.job_id], check=True, timeout=30)
        assert wait_state(sub.jobs.train.job_id, {"PENDING"}) == "PENDING"  # requeued, not failed
        runs = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", sub.jobs.train.job_id, "-o", "State"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        assert "NODE_FAIL" in runs, runs
        time.sleep(31)  # REQUEUE_EVIDENCE_S: from then on a RUNNING record is known to be stale
        out = _status(tmp_path, site, 1).stdout
        record = DatabaseManager(example_db).get_record(1)
        assert record.status == RecordState.SUBMITTED and "requeued" in record.reason, (record, out)
    finally:
        # ReturnToService=2 may have resumed it already ("Invalid node state"): fine
        subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=resume"], capture_output=True, timeout=30)
        subprocess.run(["scontrol", "release", sub.jobs.train.job_id], timeout=30)
    record, seen, took, out = _until_final(tmp_path, site, timeout_s=900)
    print(f"node down and back: {record.status} {took:.0f} s after the job was released; seen {sorted(set(seen))}")
    assert record.status == RecordState.SUCCEEDED, (record, seen, out)
    assert "FAILED" not in seen
    assert len(list(run.glob("attempt-*"))) >= 2  # the requeued job ran again
    assert (potentials_root(site.output_dir) / "1" / "potential.yaml").exists()


def _slurmdbd_pid() -> int | None:
    try:
        pid = int((SLURM_STATE / "run" / "slurmdbd.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "slurmdbd" else None


def _stop_slurmdbd() -> None:
    pid = _slurmdbd_pid()
    assert pid is not None, "no slurmdbd started by scripts/slurm/up.sh"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _start_slurmdbd() -> None:
    """As up.sh starts it (it daemonizes); no file of ours stays open in it (close_fds),
    so it never holds the tests' flock."""
    if _slurmdbd_pid() is None:
        slurmdbd = shutil.which("slurmdbd") or "/usr/sbin/slurmdbd"
        subprocess.run([slurmdbd], env={**os.environ, "SLURM_CONF": str(SLURM_STATE / "etc" / "slurm.conf")},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       close_fds=True, timeout=60)
    deadline = time.monotonic() + 60
    while subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30).returncode != 0:
        assert time.monotonic() < deadline, "slurmdbd did not answer again within 60 s"
        time.sleep(0.5)


def _job_process(job_id: str, comm_prefix: str, timeout_s: float = 300) -> int:
    """The pid of the process of SLURM job ``job_id`` whose name starts with ``comm_prefix``
    (the job's python, pacemaker), found through its SLURM_JOB_ID."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or not (proc / "comm").read_text().startswith(comm_prefix):
                    continue
                if f"SLURM_JOB_ID={job_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no {comm_prefix} process of job {job_id} within {timeout_s:.0f} s")


@pytest.mark.slow
def test_status_while_slurmdbd_is_stopped_then_the_record_ends_true(tmp_path, example_db):
    """slurmdbd really stopped while the training job runs, and the job's python killed
    meanwhile: `status` still lists the record, its jobs 'unknown' (accounting cannot
    answer) and judges nothing; once slurmdbd is back the record ends FAILED, naming the
    jobs' real states."""
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": 200}))
    _first_iteration(Path(sub.spec.run_dir))
    _stop_slurmdbd()
    try:
        os.kill(_job_process(sub.jobs.train.job_id, "python"), signal.SIGKILL)
        time.sleep(5)  # the training job has failed by now, and SLURM cancelled the evaluation
        start = time.monotonic()
        done = _status(tmp_path, site, 1)
        print(f"status without slurmdbd answered in {time.monotonic() - start:.1f} s")
        assert done.returncode == 0, done.stderr
        assert "unknown" in done.stdout and "RUNNING" in done.stdout, done.stdout
        assert DatabaseManager(example_db).get_record(1).status == RecordState.RUNNING  # not judged blind
    finally:
        _start_slurmdbd()
    record, seen, took, out = _until_final(tmp_path, site, timeout_s=300)
    print(f"slurmdbd back: {record.status} after {took:.0f} s: {record.reason}")
    assert record.status == RecordState.FAILED, (record, out)
    assert f"training job {sub.jobs.train.job_id} FAILED" in record.reason, record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["training python", "pacemaker", "evaluation python"])
def test_a_job_process_killed_with_sigkill_ends_failed_with_the_reason(tmp_path, example_db, victim):
    """kill -9 of one process of a generation on SLURM; nobody runs --wait: `status`
    (which reconciles) brings the record to FAILED, with the reason, nothing published."""
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    maxiter = 20 if victim == "evaluation python" else 200
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": maxiter}))
    if victim == "evaluation python":
        pid = _job_process(sub.jobs.evaluate.job_id, "python")
    else:
        _first_iteration(Path(sub.spec.run_dir))
        pid = _job_process(sub.jobs.train.job_id, "pacemaker" if victim == "pacemaker" else "python")
    os.kill(pid, signal.SIGKILL)
    record, seen, took, out = _until_final(tmp_path, site, timeout_s=180)
    print(f"kill -9 of the {victim}: {record.status} after {took:.0f} s: {record.reason}")
    assert record.status == RecordState.FAILED, (record, out)
    expected = {
        "training python": f"training job {sub.jobs.train.job_id} FAILED",
        "pacemaker": "pacemaker exited with code -9",
        "evaluation python": f"evaluation job {sub.jobs.evaluate.job_id} FAILED",
    }[victim]
    assert expected in record.reason, record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()
