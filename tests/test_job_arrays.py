"""Job arrays (``Scheduler.submit_array``): one task per item, each followed as its own job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.scheduler.base import SubmittedJob
from autopipec_hpc.scheduler.local import wait_until_final
from autopipec_hpc.scheduler.slurm import parse_sacct
from autopipec_hpc.states import JobRole, JobState
from tests.helpers import ci_site, wait_state


class _Folder:
    """The smallest JobFolder: everything in one folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    @property
    def submitit_dir(self) -> Path:
        return self.path / "submitit"

    def job_script(self, role: str) -> Path:
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str) -> Path:
        return self.path / f"{role}.submitted.pkl"


def write_task(folder: str, k: int, fail: bool = False) -> int:
    """A task body: writes its own file (with its array task id, where SLURM gives one)."""
    if fail:
        raise RuntimeError(f"task {k} was told to fail")
    Path(folder, f"task-{k}.txt").write_text(os.environ.get("SLURM_ARRAY_TASK_ID", "local"))
    return k


def test_sacct_row_of_an_array_not_yet_started_stands_for_each_of_its_tasks():
    name = "autopipec-g1-label-0123abcd"
    jobs = [SubmittedJob(scheduler="slurm", folder="", job_id=f"77_{k}", role=JobRole.LABEL, name=name)
            for k in range(6)]
    out = f"77_0|{name}|COMPLETED\n77_1|{name}|RUNNING\n77_[2-3,5%2]|{name}|PENDING\n"
    states = parse_sacct(out, jobs)
    assert [states[j] for j in jobs] == [JobState.COMPLETED, JobState.RUNNING, JobState.PENDING,
                                        JobState.PENDING, JobState.UNKNOWN, JobState.PENDING]
    # another job's array under the same id is not ours
    assert parse_sacct("77_[0-5]|autopipec-g1-label-ffffffff|PENDING\n", jobs) == {j: JobState.UNKNOWN for j in jobs}


def test_local_array_runs_every_task_and_a_failed_task_fails_alone(tmp_path):
    from autopipec_hpc.config import SiteConfig

    site = SiteConfig(work_dir=tmp_path / "runs", output_dir=tmp_path / "out")
    folder = _Folder(tmp_path / "array")
    scheduler = scheduler_for(site)
    jobs = scheduler.submit_array(write_task, [(str(folder.path), k, k == 1) for k in range(3)], folder=folder,
                                  role=JobRole.LABEL, name="autopipec-g1-label-test", resources=site.resources("label"))
    assert len(jobs) == 3 and len({j.job_id for j in jobs}) == 3
    assert [wait_until_final(j, 0.2) for j in jobs] == [JobState.COMPLETED, JobState.FAILED, JobState.COMPLETED]
    assert sorted(p.name for p in folder.path.glob("task-*.txt")) == ["task-0.txt", "task-2.txt"]
    assert "told to fail" in (jobs[1].last_error() or "")


@pytest.mark.slurm
def test_slurm_array_is_one_sbatch_whose_tasks_sacct_lists(tmp_path):
    site = ci_site(tmp_path, label={"partition": "cpu", "cpus": 1, "mem_gb": 0.5, "time_minutes": 5})
    folder = _Folder(tmp_path / "array")
    jobs = scheduler_for(site).submit_array(write_task, [(str(folder.path), k) for k in range(3)], folder=folder,
                                            role=JobRole.LABEL, name="autopipec-g1-label-arraytst",
                                            resources=site.resources("label"), max_parallel=2)
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{k}" for k in range(3)]
    assert "#SBATCH --array=0-2%2" in folder.job_script(JobRole.LABEL).read_text()
    for job in jobs:
        assert wait_state(job.job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 120, job.name) == "COMPLETED"
    assert {p.name: p.read_text() for p in folder.path.glob("task-*.txt")} == {
        "task-0.txt": "0", "task-1.txt": "1", "task-2.txt": "2"}
    assert scheduler_for(site).states(jobs) == [JobState.COMPLETED] * 3
