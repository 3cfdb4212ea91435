"""The scheduler contract every backend implements: run a callable as a job, follow it, cancel it.

A backend runs any picklable callable (``Scheduler.submit(fn, *args, ...)``, as
submitit's ``Executor.submit`` does), optionally after another job succeeded
(``after``), and answers job states through its one ``StateWatcher``. It knows
nothing of what the callables do: the job bodies (``jobs.py``, ``active/select_job.py``)
are handed over by the login side (``submission.py``).

Every submitted job is a ``SubmittedJob`` (scheduler, submitit folder, id, role and a
name only it has): an id alone is not trusted, since ids start again after a
cluster's controller state is lost. A run folder saves its two jobs as ``jobs.json``
(``SubmittedJobs``); a selection folder its one job as ``job.json``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from autopipec_hpc.config import JobResources
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.processes import stop_on_signals
from autopipec_hpc.run_folder import RunFolder
from autopipec_hpc.scheduler.watcher import StateWatcher
from autopipec_hpc.states import JobRole, JobState

@dataclass(frozen=True)
class StoppableBody:
    """A job body run with our stop handling (``processes.stop_on_signals``): submitit's
    job environment ignores SIGTERM until the SIGKILL that follows, so a cancelled body
    would go on meanwhile (and commit what it was told not to). Picklable."""

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        stop_on_signals()
        return self.fn(*args)


def stoppable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as the job body a backend submits. A checkpointable body (training) stays as
    it is: submitit requeues it only through its own ``checkpoint``, and it installs the
    stop handling itself."""
    return fn if hasattr(fn, "checkpoint") else StoppableBody(fn)


def job_name(generation: int, role: JobRole, folder: str | Path, submitted_at: float | None = None) -> str:
    """``autopipec-g{N}-{role}-{token}``: the token (8 hex of sha256 of the folder and the
    submission time) is this job's alone, so a job of another folder that got the same id
    (ids restart with a cluster's state) is never taken for it."""
    at = time.time() if submitted_at is None else submitted_at
    token = hashlib.sha256(f"{Path(folder).resolve()}\0{at!r}".encode()).hexdigest()[:8]
    return f"autopipec-g{generation}-{role}-{token}"


# How much of a job's own last error goes into a record's reason, and how far back in
# its log of errors it is looked for.
LAST_ERROR_CHARS = 300
LOG_LINES_READ = 400
# "OSError: [Errno 28] No space left on device: ...", "autopipec_hpc.errors.JobStopped: ..."
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Interrupted|Stopped|Exit)): \S")


def _last_exception_line(lines: Sequence[str]) -> str | None:
    """The last line that names an exception and its message (a traceback's last line)."""
    for line in reversed(lines):
        text = line.strip()
        if _EXCEPTION_LINE.match(text):
            return " ".join(text.split())
    return None


class SubmittedJob(BaseModel):
    """One submitted job, saved as JSON so that any later process can follow or cancel it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    scheduler: str
    folder: str  # submitit's folder: logs and pickles
    job_id: str
    role: JobRole
    # The job's name as the scheduler lists it; "" only in a jobs.json written before
    # names carried a token (trusted by id alone, as it was then).
    name: str = ""
    time_minutes: int = 0  # its time limit (a local dependent job waits within its own)

    @property
    def stderr(self) -> Path:
        """The job's log of errors (submitit names it after the job id)."""
        from submitit.core.utils import JobPaths  # submitit imports asyncio: not on every CLI start

        return JobPaths(self.folder, self.job_id).stderr

    def last_error(self) -> str | None:
        """The job's own last error, as it wrote it: the last line of the traceback in its
        result pickle (submitit's, for a body that raised), else the last exception line of
        its log of errors; None where it wrote none (killed outright, or it succeeded)."""
        from submitit.core.utils import JobPaths

        paths = JobPaths(self.folder, self.job_id)
        try:
            with open(paths.result_pickle, "rb") as handle:
                outcome, value = pickle.load(handle)[:2]
            if outcome != "success":
                line = _last_exception_line(str(value).splitlines())
                if line:
                    return line[:LAST_ERROR_CHARS]
        except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError, AttributeError, ImportError):
            pass  # no pickle (killed, or a cluster that lost it), or one mid-write: the log may say
        try:
            lines = paths.stderr.read_text(errors="replace").splitlines()[-LOG_LINES_READ:]
        except OSError:
            return None
        line = _last_exception_line(lines)
        return line[:LAST_ERROR_CHARS] if line else None

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> "SubmittedJob":
        if not path.exists():
            raise SchedulerError(f"{path.parent} has no {path.name}: no job was submitted from it")
        return cls.model_validate_json(path.read_text())


class SubmittedJobs(BaseModel):
    """The jobs of one generation (training, then its evaluation, then its validation where
    the config validates), saved in its run folder."""

    model_config = ConfigDict(frozen=True)

    train: SubmittedJob
    evaluate: SubmittedJob
    validate_job: SubmittedJob | None = None  # `validate` is a BaseModel method

    @property
    def scheduler(self) -> str:
        return self.train.scheduler

    @property
    def all(self) -> tuple[SubmittedJob, ...]:
        """Every job, in the order they run."""
        return (self.train, self.evaluate) + ((self.validate_job,) if self.validate_job is not None else ())

    def by_role(self, role: JobRole) -> SubmittedJob:
        return next(job for job in self.all if job.role == JobRole(role))

    def save(self, run_dir: str | Path) -> None:
        atomic_write_text(RunFolder(run_dir).jobs_file, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> "SubmittedJobs":
        path = RunFolder(run_dir).jobs_file
        if not path.exists():
            raise SchedulerError(f"{run_dir} has no {path.name}: nothing was submitted from it")
        data: dict[str, Any] = json.loads(path.read_text())
        if isinstance(data.get("train"), str):  # the format before jobs had names: ids only
            data = {role: {"scheduler": data["scheduler"], "folder": data["folder"], "job_id": data[role],
                           "role": role} for role in (JobRole.TRAIN, JobRole.EVALUATE)}
        return cls.model_validate(data)


class JobFolder(Protocol):
    """Where a job keeps its scheduler files (``RunFolder`` and ``SelectionFolder`` are ones)."""

    @property
    def path(self) -> Path: ...

    @property
    def submitit_dir(self) -> Path: ...

    def job_script(self, role: str) -> Path: ...

    def submitted_pickle(self, role: str) -> Path: ...


class Scheduler(Protocol):
    """Where job bodies run. A new scheduler is one new module implementing this."""

    name: str
    # What ``check`` verifies, as the preflight names it in an error.
    check_name: str
    # The one watcher of this backend's job states (scheduler/watcher.py).
    watcher: StateWatcher

    def check(self) -> list[str]:
        """Raise SchedulerError if this machine cannot submit jobs and follow them;
        return warnings (a partition that is down) that do not stop a submission."""
        ...

    def pending_reason(self, job: SubmittedJob) -> str | None:
        """Why a pending job waits, as the scheduler says (None where it does not say)."""
        ...

    def job_preamble(self, job_dir: Path, role: JobRole, folder: Path) -> list[str]:
        """The lines a job script runs before the job body (none where there is no script)."""
        ...

    def submit(self, fn: Callable[..., Any], *args: Any, folder: JobFolder, role: JobRole, name: str,
               resources: JobResources, after: SubmittedJob | None = None) -> SubmittedJob:
        """Run ``fn(*args)`` as one job named ``name`` with ``resources``; with ``after``, only
        once that job COMPLETED (it ends without running ``fn`` if that job did not)."""
        ...

    def submit_array(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], *, folder: JobFolder,
                     role: JobRole, name: str, resources: JobResources, max_parallel: int | None = None,
                     after: SubmittedJob | None = None) -> list[SubmittedJob]:
        """Run ``fn(*task)`` for each of ``tasks`` as one job array (on SLURM ``--array``,
        at most ``max_parallel`` at once; locally one process each), every task named
        ``name`` and followed as its own ``SubmittedJob`` (SLURM ids ``ARRAY_TASK``), in
        the order of ``tasks``. A task that dies loses only its own work."""
        ...

    def states(self, jobs: Sequence[SubmittedJob]) -> list[JobState]:
        """The jobs' states, from the watcher (one batched query where one is due)."""
        ...

    def cancel(self, *jobs: SubmittedJob) -> None:
        """Cancel ``jobs``, each only if it is still the job of that name."""
        ...


def state_with_reason(scheduler: Scheduler, job: SubmittedJob, state: JobState) -> str:
    """A job's state as a person reads it: a waiting one (PENDING, or UNKNOWN while
    accounting has not seen it) with the scheduler's reason, "PENDING (Resources)"."""
    if state in (JobState.PENDING, JobState.UNKNOWN):
        reason = scheduler.pending_reason(job)
        if reason:
            return f"{state} ({reason})"
    return str(state)

