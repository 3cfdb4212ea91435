"""The scheduler contract every backend implements: job states, submitted job ids, the protocol.

A scheduler takes a prepared ``RunSpec`` and submits two jobs, training and
an evaluation that runs only after training succeeded. It records the job
ids in the run folder (``RunFolder.jobs_file``) so that status and cancel work
from any later process. It also submits one standalone job (``submit_task``:
a selection) into a folder that keeps its script and log (``TaskFolder``).
"""

from __future__ import annotations

from autopipec_hpc.states import JobState

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from submitit.core.utils import JobPaths

from autopipec_hpc.config import JobResources
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import RunFolder, RunSpec


@dataclass(frozen=True)
class SubmittedJobs:
    """The scheduler and job ids of one generation, saved in its run folder."""

    scheduler: str
    folder: str
    train: str
    evaluate: str

    def save(self, run_dir: Path) -> None:
        atomic_write_text(RunFolder(run_dir).jobs_file, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> "SubmittedJobs":
        path = RunFolder(run_dir).jobs_file
        if not path.exists():
            raise SchedulerError(f"{run_dir} has no {path.name}: nothing was submitted from it")
        return cls(**json.loads(path.read_text()))


class TaskFolder(Protocol):
    """Where a standalone job keeps its scheduler files (``SelectionFolder`` is one)."""

    @property
    def path(self) -> Path: ...

    @property
    def submitit_dir(self) -> Path: ...

    def job_script(self, role: str) -> Path: ...

    def submitted_pickle(self, role: str) -> Path: ...


@dataclass(frozen=True)
class SubmittedTask:
    """The scheduler and job id of one standalone job, saved in its folder."""

    scheduler: str
    folder: str  # submitit's folder: logs and pickles
    job_id: str
    role: str
    name: str  # the job's name, as the scheduler lists it

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "SubmittedTask":
        if not path.exists():
            raise SchedulerError(f"{path.parent} has no {path.name}: no job was submitted from it")
        return cls(**json.loads(path.read_text()))

    @property
    def stderr(self) -> Path:
        """The job's log of errors (submitit names it after the job id)."""
        return JobPaths(self.folder, self.job_id).stderr


# A standalone job's body (picklable): called with its folder's path on the compute node.
Task = Callable[[str], Any]


class Scheduler(Protocol):
    """Where the job bodies run. A new scheduler is one new module implementing this."""

    name: str
    # What ``check`` verifies, as the preflight names it in an error.
    check_name: str

    def check(self) -> list[str]:
        """Raise SchedulerError if this machine cannot submit jobs and follow them;
        return warnings (a partition that is down) that do not stop a submission."""
        ...

    def pending_reason(self, jobs: SubmittedJobs, which: str) -> str | None:
        """Why a pending job waits, as the scheduler says (None where it does not say)."""
        ...

    def job_preamble(self, run_dir: Path, role: str, folder: Path) -> list[str]:
        """The lines a job script runs before the job body (none where there is no script)."""
        ...

    def submit(self, spec: RunSpec) -> SubmittedJobs: ...

    def state(self, jobs: SubmittedJobs, which: str) -> JobState: ...

    def cancel(self, jobs: SubmittedJobs) -> None: ...

    def submit_task(self, task: Task, folder: TaskFolder, role: str, name: str,
                    resources: JobResources) -> SubmittedTask:
        """Submit ``task(str(folder.path))`` as one job named ``name``, with ``resources``."""
        ...

    def task_state(self, task: SubmittedTask) -> JobState: ...
