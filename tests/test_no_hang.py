"""Nothing hangs: no accounting, or a job whose result never comes, ends in bounded time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autopipec_hpc.errors import PreflightError, SchedulerError
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.example_data import tiny_train_config
from autopipec_hpc.scheduler.slurm import sacct_state
from autopipec_hpc.generation import cancel_generation, wait_for_generation
from autopipec_hpc.submission import submit_generation
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker


def test_sacct_missing_is_a_clear_error_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands at all
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="sacct not found"):
        sacct_state("1")
    assert time.monotonic() - start < 5


def test_slurm_site_without_accounting_is_refused_before_submitting(monkeypatch, tmp_path, example_db, local_site):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    sbatch = fake_bin / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'slurm 22.05.8'\n")  # a login node whose cluster has no sacct
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))  # sbatch answers, sacct does not exist
    site = local_site().model_copy(update={"scheduler": "slurm"})
    with pytest.raises(PreflightError, match="SLURM with accounting.*sacct not found"):
        submit_generation(example_db, site, tiny_train_config())
    assert DatabaseManager(example_db).get_record(1).status == "FAILED"


def test_waiting_for_a_result_that_never_comes_is_bounded(tmp_path, example_db, local_site):
    site = local_site(str(make_fault_pacemaker(tmp_path, "hang")))
    sub = submit_generation(example_db, site, tiny_train_config())
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="not finished after 4 s"):
        wait_for_generation(Path(sub.spec.run_dir), timeout_s=4)
    assert time.monotonic() - start < 15
    cancel_generation(Path(sub.spec.run_dir))
