"""The local scheduler: submitit's LocalExecutor on this machine.

submitit's local executor has no job dependencies, so the evaluation job
starts at once and waits for the training job's verdict in the run folder
(or for the training process to vanish): the same contract as SLURM's
``afterok`` with ``kill_invalid_depend``.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths

from autopipec_hpc.config import JobResources, SiteConfig
from autopipec_hpc.processes import die_with_local_controller, pid_alive  # noqa: F401  (tests import pid_alive from here)
from autopipec_hpc.errors import SchedulerError, TrainingFailedError
from autopipec_hpc.jobs import EvaluateJob, TrainJob, record_failure, training_verdict
from autopipec_hpc.run_folder import RunSpec
from autopipec_hpc.scheduler.base import SubmittedJobs, SubmittedTask, Task, TaskFolder
from autopipec_hpc.states import JobState


def wait_for_training(run_dir: str, train_alive: Callable[[], bool], poll_s: float = 1.0) -> dict[str, Any]:
    """The local executor's ``afterok``: block until training has a verdict, or its job is gone."""
    path = Path(run_dir)
    while True:
        verdict = training_verdict(path)
        if verdict is not None:
            return verdict
        if not train_alive():
            time.sleep(poll_s)  # the verdict may land just after the process ends
            verdict = training_verdict(path)
            if verdict is not None:
                return verdict
            spec = RunSpec.load(run_dir)
            record_failure(spec, "FAILED", "the training job ended without a result")
            return {"ok": False, "reason": "the training job ended without a result"}
        time.sleep(poll_s)



@dataclass(frozen=True)
class EvaluateAfterTraining:
    """The evaluation job body with the local ``afterok`` in front of it (picklable)."""

    train_pid: int

    def __call__(self, run_dir: str) -> dict:
        die_with_local_controller()
        verdict = wait_for_training(run_dir, lambda: pid_alive(self.train_pid))
        if not verdict.get("ok"):
            raise TrainingFailedError(
                f"evaluation not run: training did not succeed ({verdict.get('reason', 'unknown')})"
            )
        return EvaluateJob()(run_dir)


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
    cancelled = (folder / f"{job_id}.cancelled").exists()
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


class LocalScheduler:
    name = "local"
    check_name = "local executor"

    def __init__(self, site: SiteConfig) -> None:
        self.site = site

    def check(self) -> list[str]:
        """Nothing to check: the jobs are processes on this machine."""
        return []

    def pending_reason(self, jobs: SubmittedJobs, which: str) -> str | None:
        return None  # local jobs start at once

    def job_preamble(self, run_dir: Path, role: str, folder: Path) -> list[str]:
        return []  # no job script: submitit starts the job body directly

    def _executor(self, folder: Path, minutes: int) -> submitit.LocalExecutor:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=minutes, signal_delay_s=self.site.signal_delay_s)
        return executor

    def submit(self, spec: RunSpec) -> SubmittedJobs:
        folder = spec.folder.submitit_dir
        with _stdio_to_devnull():
            return self._submit(spec, folder)

    def _submit(self, spec: RunSpec, folder: Path) -> SubmittedJobs:
        train = self._executor(folder, self.site.train.time_minutes).submit(TrainJob(), spec.run_dir)
        evaluate = self._executor(
            folder, self.site.train.time_minutes + self.site.evaluate.time_minutes
        ).submit(EvaluateAfterTraining(int(train.job_id)), spec.run_dir)
        jobs = SubmittedJobs(self.name, str(folder), str(train.job_id), str(evaluate.job_id))
        jobs.save(spec.path)
        return jobs

    def submit_task(self, task: Task, folder: TaskFolder, role: str, name: str,
                    resources: JobResources) -> SubmittedTask:
        """One job process on this machine (``name`` and partitions mean nothing here)."""
        with _stdio_to_devnull():
            job = self._executor(folder.submitit_dir, resources.time_minutes).submit(task, str(folder.path))
        return SubmittedTask(self.name, str(folder.submitit_dir), str(job.job_id), role, name)

    def task_state(self, task: SubmittedTask) -> JobState:
        return job_state(Path(task.folder), task.job_id)

    def state(self, jobs: SubmittedJobs, which: str) -> JobState:
        return job_state(Path(jobs.folder), getattr(jobs, which))

    def cancel(self, jobs: SubmittedJobs) -> None:
        for job_id in (jobs.evaluate, jobs.train):
            pid = int(job_id)
            if not pid_alive(pid):
                continue
            (Path(jobs.folder) / f"{job_id}.cancelled").touch()
            try:
                # submitit's local controller forwards SIGTERM to the job process,
                # whose handler ends pacemaker's process group.
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                raise SchedulerError(f"cannot cancel local job {pid}: {exc}") from exc
