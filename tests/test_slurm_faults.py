"""Faults on the real CI cluster: jobs cancelled by hand, a requeue SLURM starts, a
partition that is down, accounting that cannot answer, and PostgreSQL as the
database of a whole SLURM run. Each ends in the true state with nobody running --wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopipec_hpc.db import DatabaseManager, RecordState
from autopipec_hpc.example_data import tiny_train_config, write_example_database
from autopipec_hpc.registry import potentials_root
from autopipec_hpc.submission import cancel_generation, submit_generation, wait_for_generation
from tests.test_slurm import _wait_state, ci_site, slurm_cluster  # noqa: F401  (the cluster fixture)
from tests.test_state import _postgres_database

pytestmark = pytest.mark.slurm
CLI = [sys.executable, "-m", "autopipec_hpc.cli"]


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
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config())
    assert _wait_state(sub.jobs.train, {"RUNNING"}) == "RUNNING"
    subprocess.run(["scancel", sub.jobs.evaluate], check=True, timeout=30)
    assert _wait_state(sub.jobs.train, {"COMPLETED", "FAILED"}, timeout_s=300) == "COMPLETED"
    deadline = time.monotonic() + 60
    while True:
        done = _status(tmp_path, site, 1)
        record = DatabaseManager(example_db).get_record(1)
        if record.status.is_final or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert record.status == RecordState.FAILED, (record, done.stdout)
    assert f"evaluation job {sub.jobs.evaluate} CANCELLED" in record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.slow
def test_a_requeue_started_by_slurm_is_never_a_failure(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config().model_copy(update={"maxiter": 60}))
    run = Path(sub.spec.run_dir)
    _first_iteration(run)
    subprocess.run(["scontrol", "requeue", sub.jobs.train], check=True, timeout=30)
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
        assert _wait_state(sub.jobs.train, {"PENDING"}) == "PENDING"
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
    site = ci_site(tmp_path, pacemaker={"evaluator": "pyace"})
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
    url = _postgres_database()
    write_example_database(DatabaseManager(url))
    site = ci_site(tmp_path, database=url, pacemaker={"evaluator": "pyace"})
    sub = submit_generation(url, site, tiny_train_config())
    record = wait_for_generation(Path(sub.spec.run_dir), timeout_s=900)
    assert record.status == RecordState.SUCCEEDED
    assert (potentials_root(site.output_dir) / "1" / "potential.yaml").exists()
    script = (Path(sub.spec.run_dir) / "train.sbatch").read_text()
    assert "PGPASSWORD" not in script and "password" not in script.lower()
    used = DatabaseManager(url).count(generation=1)
    assert used > 0  # the evaluation job marked the structures it trained on, in PostgreSQL
