"""Where the job bodies run: one module per scheduler, one small shared contract.

A scheduler takes a prepared ``RunSpec`` and submits two jobs, training and
an evaluation that runs only after training succeeded. It records the job
ids in the run folder (``jobs.json``) so that status and cancel work from any
later process. A new scheduler is one new module implementing ``Scheduler``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import RunFolder, RunSpec

# Job states as we report them, whatever the scheduler calls them.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN",
)
FINISHED = {COMPLETED, FAILED, CANCELLED}


@dataclass(frozen=True)
class SubmittedJobs:
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


class Scheduler(Protocol):
    name: str

    def submit(self, spec: RunSpec) -> SubmittedJobs: ...

    def state(self, jobs: SubmittedJobs, which: str) -> str: ...

    def cancel(self, jobs: SubmittedJobs) -> None: ...


def scheduler_for(site: SiteConfig) -> Scheduler:
    if site.scheduler == "local":
        from autopipec_hpc.scheduler.local import LocalScheduler

        return LocalScheduler(site)
    from autopipec_hpc.scheduler.slurm import SlurmScheduler

    return SlurmScheduler(site)
