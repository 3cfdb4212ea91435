"""The local scheduler: submitit's LocalExecutor on this machine.

submitit's local executor has no job dependencies, so a job submitted ``after``
another starts at once inside ``AfterJob``: it waits until that job's state is final
(its result pickle, or its process gone) and runs its body only if that job
COMPLETED, else it ends FAILED naming the dependency, never running the body: the
same contract as SLURM's ``afterok`` with ``kill_invalid_depend``.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths
from submitit.local.local import LocalJob

from autopipec_hpc.config import JobResources, SiteConfig
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.processes import die_with_local_controller, local_cancel_marker, pid_alive  # noqa: F401  (tests import pid_alive from here)
from autopipec_hpc.scheduler.base import JobFolder, SubmittedJob, stoppable
from autopipec_hpc.scheduler.watcher import StateWatcher
from autopipec_hpc.states import FINISHED, JobRole, JobState

# Local checks are a file and /proc: cheap, so the watcher backs off only to a few seconds.
LOCAL_MIN_DELAY_S = 0.5
LOCAL_MAX_DELAY_S = 4.0
# A job's result pickle may land just after its process is gone (a shared filesystem).
RESULT_GRACE_S = 1.0


def result_state(folder: Path, job_id: str) -> JobState | None:
    """COMPLETED or FAILED from submitit's result pickle; None while there is none."""
    path = JobPaths(folder, job_id).result_pickle
    if not path.exists():
        return None
    try:
        with open(path, "rb") as handle:
            outcome = pickle.load(handle)[0]
    except Exception:  # a pickle mid-write or from another version: not decisive yet
        return None
    return JobState.COMPLETED if outcome == "success" else JobState.FAILED


def job_state(folder: Path, job_id: str) -> JobState:
    """A local job's state: its result pickle, else whether its process lives (and was cancelled)."""
    cancelled = local_cancel_marker(folder, job_id).exists()
    done = result_state(folder, job_id)
    if done is not None:
        return JobState.CANCELLED if cancelled and done == JobState.FAILED else done
    if pid_alive(int(job_id)):
        return JobState.RUNNING
    return JobState.CANCELLED if cancelled else JobState.FAILED  # gone without a result


@contextmanager
def _stdio_to_devnull() -> Iterator[None]:
    """Job processes inherit stdout/stderr; give them /dev/null (their logs go to
    files in the run folder) so a caller's pipe is not held open until they end."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


class SessionLocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor whose job controllers start in their own session. In the
    submitting command's process group, a Ctrl-C of `submit --wait` or `loop` reached the
    controllers and job bodies too, and ended the jobs it only waited for. This is
    submitit's ``_submit_command``/``start_controller`` (same environment, same command;
    the controller's pid is the job id) with ``start_new_session``, which they cannot pass."""

    def _submit_command(self, command: str) -> LocalJob:
        params = self.parameters
        gpus = range(params.get("gpus_per_node", 0))
        env = dict(os.environ)
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(params.get("tasks_per_node", 1)),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * params.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(params.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="1" if params.get("stderr_to_stdout", False) else "",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
            SUBMITIT_LOCAL_WITH_SHELL="",
        )
        process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(self.folder)], env=env,
                                   start_new_session=True)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process,
                        tasks=list(range(params.get("tasks_per_node", 1))))


@dataclass(frozen=True)
class AfterJob:
    """The local ``afterok`` (picklable): wait for ``after`` to end, then run ``fn(*args)``
    only if it COMPLETED."""

    after: SubmittedJob
    fn: Callable[..., Any]
    poll_s: float = 1.0

    def __call__(self, *args: Any) -> Any:
        die_with_local_controller()
        state = wait_until_final(self.after, self.poll_s)
        if state != JobState.COMPLETED:
            raise SchedulerError(
                f"not run: the {self.after.role} job {self.after.job_id} it depends on ended {state}"
            )
        return self.fn(*args)


def wait_until_final(job: SubmittedJob, poll_s: float = 1.0) -> JobState:
    """Block until ``job``'s local state is final; a process gone without a result gets
    ``RESULT_GRACE_S`` for its pickle to appear."""
    folder = Path(job.folder)
    while True:
        state = job_state(folder, job.job_id)
        if state in FINISHED:
            if result_state(folder, job.job_id) is None:
                time.sleep(RESULT_GRACE_S)
                state = job_state(folder, job.job_id)
            return state
        time.sleep(poll_s)


def local_states(jobs: Sequence[SubmittedJob]) -> dict[SubmittedJob, JobState]:
    """The watcher's query on this machine: each job's result pickle and process."""
    return {job: job_state(Path(job.folder), job.job_id) for job in jobs}


class LocalScheduler:
    name = "local"
    check_name = "local executor"

    def __init__(self, site: SiteConfig, watcher: StateWatcher | None = None) -> None:
        self.site = site
        self.watcher = watcher or StateWatcher(local_states, min_delay_s=LOCAL_MIN_DELAY_S,
                                               max_delay_s=LOCAL_MAX_DELAY_S)

    def check(self) -> list[str]:
        """Nothing to check: the jobs are processes on this machine."""
        return []

    def pending_reason(self, job: SubmittedJob) -> str | None:
        return None  # local jobs start at once

    def job_preamble(self, job_dir: Path, role: JobRole, folder: Path) -> list[str]:
        return []  # no job script: submitit starts the job body directly

    def _executor(self, folder: Path, minutes: int) -> submitit.LocalExecutor:
        executor = SessionLocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=minutes, signal_delay_s=self.site.signal_delay_s)
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any, folder: JobFolder, role: JobRole, name: str,
               resources: JobResources, after: SubmittedJob | None = None) -> SubmittedJob:
        """One job process on this machine (``name`` and partitions mean nothing here). A job
        ``after`` another waits inside its own time limit: the other's limit plus its own."""
        minutes = resources.time_minutes
        body: Callable[..., Any] = fn
        if after is not None:
            body = AfterJob(after, fn)
            minutes += after.time_minutes
        body = stoppable(body)
        with _stdio_to_devnull():
            job = self._executor(folder.submitit_dir, minutes).submit(body, *args)
        submitted = SubmittedJob(scheduler=self.name, folder=str(folder.submitit_dir), job_id=str(job.job_id),
                                 role=role, name=name, time_minutes=minutes)
        return self.watcher.follow(submitted)

    def submit_array(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], *, folder: JobFolder,
                     role: JobRole, name: str, resources: JobResources, max_parallel: int | None = None,
                     after: SubmittedJob | None = None) -> list[SubmittedJob]:
        """One local job per task, all started at once (``max_parallel`` is SLURM's: callers
        size the array for this machine)."""
        return [self.submit(fn, *task, folder=folder, role=role, name=name, resources=resources, after=after)
                for task in tasks]

    def states(self, jobs: Sequence[SubmittedJob]) -> list[JobState]:
        return self.watcher.states(jobs)

    def cancel(self, *jobs: SubmittedJob) -> None:
        for job in jobs:
            pid = int(job.job_id)
            if not pid_alive(pid) or result_state(Path(job.folder), job.job_id) is not None:
                continue  # ended already (and its pid may be another process's by now)
            local_cancel_marker(job.folder, job.job_id).touch()
            try:
                # submitit's local controller forwards SIGTERM to the job process,
                # whose handler ends pacemaker's process group.
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                raise SchedulerError(f"cannot cancel local job {pid}: {exc}") from exc
        self.watcher.soon()
