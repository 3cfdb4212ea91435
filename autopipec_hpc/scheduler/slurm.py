"""The SLURM scheduler: submitit's SlurmExecutor, built from a SiteConfig.

Each job goes to its role's partition (training with its GPUs); a job submitted
``after`` another gets ``afterok`` and ``--kill-on-invalid-dep=yes``, so a failed
training removes its evaluation instead of leaving it pending forever. Job states
are read with ONE ``sacct`` for all followed jobs (the watcher's query), by id AND
name: after a cluster lost its state, an id may name another folder's job, whose
state is never adopted (nor is that job cancelled: ``scancel`` names the job too).
Every command runs under a timeout: a cluster without accounting gives a clear
error, never a hang. The scripts that ran are kept in the job's folder
(``RunFolder.job_script``) and can be resubmitted by hand.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from autopipec_hpc.config import JobResources, SiteConfig
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.run_folder import submitted_pickle_name
from autopipec_hpc.scheduler.base import JobFolder, SubmittedJob, stoppable
from autopipec_hpc.scheduler.watcher import StateWatcher
from autopipec_hpc.states import JobRole, JobState
from autopipec_hpc.templates import template_environment

COMMAND_TIMEOUT_S = 30
# sacct's states -> ours. A requeued job reads PENDING/REQUEUED until it runs again.
_PENDING, _RUNNING, _COMPLETED, _CANCELLED, _FAILED = (
    JobState.PENDING, JobState.RUNNING, JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED,
)
STATE_MAP: dict[str, JobState] = {
    "PENDING": _PENDING, "REQUEUED": _PENDING, "REQUEUE_HOLD": _PENDING, "REQUEUE_FED": _PENDING,
    "RESIZING": _PENDING, "SUSPENDED": _PENDING, "CONFIGURING": _PENDING,
    "RUNNING": _RUNNING, "COMPLETING": _RUNNING, "STAGE_OUT": _RUNNING, "SIGNALING": _RUNNING,
    "COMPLETED": _COMPLETED,
    "CANCELLED": _CANCELLED, "REVOKED": _CANCELLED, "DEADLINE": _CANCELLED,
    "FAILED": _FAILED, "TIMEOUT": _FAILED, "NODE_FAIL": _FAILED, "PREEMPTED": _FAILED,
    "OUT_OF_MEMORY": _FAILED, "BOOT_FAIL": _FAILED,
}


def run_command(args: list[str], what: str) -> str:
    """A SLURM client command with a timeout; errors name the command."""
    if shutil.which(args[0]) is None:
        raise SchedulerError(f"{args[0]} not found: {what} needs SLURM's client commands on this machine")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{' '.join(args)} gave no answer within {COMMAND_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise SchedulerError(f"{' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def parse_sacct(out: str, jobs: Sequence[SubmittedJob]) -> dict[SubmittedJob, JobState]:
    """``jobs``' states from ``sacct -P -o JobID,JobName,State`` rows. A row counts for a job
    only with the job's id AND name: a row of the same id under another name is another
    job (ids restart after a cluster lost its state), so that job is UNKNOWN, never given
    the other's state. A job saved without a name (an old jobs.json) goes by id alone."""
    rows: dict[tuple[str, str], str] = {}
    by_id: dict[str, str] = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 3 or not fields[0]:
            continue
        name, state = "|".join(fields[1:-1]), fields[-1]
        word = state.split()[0].rstrip("+") if state.split() else ""
        for job_id in _array_task_ids(fields[0]):
            rows[(job_id, name)] = word  # the last row of a pair is the newest
            by_id[job_id] = word
    found = {}
    for job in jobs:
        word = rows.get((job.job_id, job.name)) if job.name else by_id.get(job.job_id)
        found[job] = STATE_MAP.get(word, JobState.UNKNOWN) if word else JobState.UNKNOWN
    return found


_ARRAY_ROW = re.compile(r"^(\d+)_\[([0-9,\-]+)(%\d+)?\]$")


def _array_task_ids(job_id: str) -> list[str]:
    """The ids a sacct row stands for: itself, or each task of an array's tasks that have
    not started, which sacct lists as one row ``ARRAY_[0-3,5%2]``."""
    match = _ARRAY_ROW.match(job_id)
    if not match:
        return [job_id]
    ids = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            ids.extend(f"{match.group(1)}_{k}" for k in range(int(low), int(high or low) + 1))
    return ids


def sacct_states(jobs: Sequence[SubmittedJob]) -> dict[SubmittedJob, JobState]:
    """The states of ``jobs`` from one ``sacct`` call (UNKNOWN where accounting has not seen one)."""
    if not jobs:
        return {}
    ids = ",".join(sorted({job.job_id for job in jobs}, key=lambda i: (len(i), i)))
    out = run_command(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobID,JobName,State"], "reading job states")
    return parse_sacct(out, jobs)


def sacct_state(job_id: str, name: str | None = None) -> JobState:
    """The state of one job ``job_id`` (named ``name``, where given), asked now: for tests
    and scripts; the scheduler itself asks through its watcher."""
    job = SubmittedJob(scheduler="slurm", folder="", job_id=job_id, role=JobRole.TRAIN, name=name or "")
    return sacct_states([job])[job]


def setup_lines(site: SiteConfig, run_dir: Path, role: str, folder: Path) -> list[str]:
    """The compute-node preamble, from job_templates/slurm_setup.sh.j2."""
    template = template_environment().get_template("slurm_setup.sh.j2")
    text = template.render(site=site, role=role, run_dir=str(run_dir), folder=str(folder),
                           submitted_pickle=str(Path(folder) / submitted_pickle_name(role)), quote=shlex.quote)
    return [line for line in text.splitlines() if line.strip()]


def keep_job_files(job: submitit.Job, folder: JobFolder, role: str) -> None:
    """Keep a job's script and pickle beside its story: readable, and `sbatch <role>.sbatch`
    reruns the same job (the preamble gives a hand-submitted job id its pickle)."""
    shutil.copy2(job.paths.submitted_pickle, folder.submitted_pickle(role))
    shutil.copy2(job.paths.submission_file, folder.job_script(role))


class SlurmScheduler:
    name = "slurm"
    check_name = "SLURM with accounting"

    def __init__(self, site: SiteConfig, watcher: StateWatcher | None = None) -> None:
        self.site = site
        self.watcher = watcher or StateWatcher(sacct_states)

    def check(self) -> list[str]:
        """sbatch must exist, sacct must answer (submitit follows jobs only through it),
        and the site's partitions must exist; a partition that is not up is a warning:
        its jobs would wait until it is."""
        run_command(["sbatch", "--version"], "submitting")
        run_command(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], "following jobs")
        return self._check_partitions()

    def _check_partitions(self) -> list[str]:
        out = run_command(["sinfo", "-h", "-o", "%R|%a|%D|%t"], "listing partitions")
        partitions: dict[str, list[tuple[str, str]]] = {}
        for line in out.splitlines():
            name, avail, _nodes, node_state = (line.split("|") + ["", "", "", ""])[:4]
            partitions.setdefault(name.strip(), []).append((avail.strip(), node_state.strip()))
        roles_of: dict[str, list[str]] = {}
        for role, res in self.site.job_resources().items():
            if res.partition:
                roles_of.setdefault(res.partition, []).append(role)
        warnings = []
        for partition, roles in roles_of.items():
            role = "/".join(roles)
            if partition not in partitions:
                raise SchedulerError(
                    f"the {role} partition {partition!r} does not exist (sinfo lists: "
                    f"{', '.join(sorted(partitions)) or 'none'})"
                )
            states = partitions[partition]
            if all(avail != "up" for avail, _ in states):
                warnings.append(f"the {role} partition {partition!r} is {states[0][0]}: "
                                "its jobs will wait (PENDING) until it is up")
            elif all(node.rstrip("*~#!%$@^-") in ("down", "drain", "drained", "fail", "inval") for _, node in states):
                warnings.append(f"every node of the {role} partition {partition!r} is "
                                f"{'/'.join(sorted({n for _, n in states}))}: its jobs will wait until one is back")
        return warnings

    def pending_reason(self, job: SubmittedJob) -> str | None:
        by_name = ["-n", job.name] if job.name else []
        try:
            out = run_command(["squeue", "-h", "-j", job.job_id, *by_name, "-o", "%r"], "reading why a job waits")
        except SchedulerError:
            return None
        reason = out.strip().splitlines()[-1].strip() if out.strip() else ""
        return reason if reason and reason != "None" else None

    def job_preamble(self, job_dir: Path, role: JobRole, folder: Path) -> list[str]:
        return setup_lines(self.site, job_dir, role, folder)

    def _executor(self, folder: Path, name: str, role: str, job_dir: Path, res: JobResources,
                  extra: dict[str, str]) -> submitit.SlurmExecutor:
        """An executor for one job: logs in ``folder`` (submitit's), the preamble for ``job_dir``."""
        executor = submitit.SlurmExecutor(
            folder=folder, python=self.site.python_executable, max_num_timeout=self.site.max_restarts
        )
        params: dict = dict(
            job_name=name,
            time=res.time_minutes,
            cpus_per_task=res.cpus,
            mem=f"{int(res.mem_gb * 1024)}M",
            signal_delay_s=self.site.signal_delay_s,
            setup=setup_lines(self.site, job_dir, role, folder),
            additional_parameters=extra,
        )
        if res.partition:
            params["partition"] = res.partition
        if res.account:
            params["account"] = res.account
        if res.qos:
            params["qos"] = res.qos
        if res.gpus:
            params["gres"] = f"gpu:{res.gpus}"
        executor.update_parameters(**params)
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any, folder: JobFolder, role: JobRole, name: str,
               resources: JobResources, after: SubmittedJob | None = None) -> SubmittedJob:
        extra = {} if after is None else {"dependency": f"afterok:{after.job_id}", "kill-on-invalid-dep": "yes"}
        executor = self._executor(folder.submitit_dir, name, role, folder.path, resources, extra)
        job = executor.submit(stoppable(fn), *args)
        keep_job_files(job, folder, role)
        submitted = SubmittedJob(scheduler=self.name, folder=str(folder.submitit_dir), job_id=str(job.job_id),
                                 role=role, name=name, time_minutes=resources.time_minutes)
        return self.watcher.follow(submitted)

    def submit_array(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], *, folder: JobFolder,
                     role: JobRole, name: str, resources: JobResources, max_parallel: int | None = None,
                     after: SubmittedJob | None = None) -> list[SubmittedJob]:
        """One ``sbatch --array`` (submitit's batch): task k runs ``fn(*tasks[k])``."""
        if not tasks:
            return []
        extra = {} if after is None else {"dependency": f"afterok:{after.job_id}", "kill-on-invalid-dep": "yes"}
        executor = self._executor(folder.submitit_dir, name, role, folder.path, resources, extra)
        if max_parallel:
            executor.update_parameters(array_parallelism=max_parallel)
        body = stoppable(fn)
        with executor.batch():
            jobs = [executor.submit(body, *task) for task in tasks]
        shutil.copy2(jobs[0].paths.submission_file, folder.job_script(role))
        submitted = [SubmittedJob(scheduler=self.name, folder=str(folder.submitit_dir), job_id=str(job.job_id),
                                  role=role, name=name, time_minutes=resources.time_minutes) for job in jobs]
        for job in submitted:
            self.watcher.follow(job)
        return submitted

    def states(self, jobs: Sequence[SubmittedJob]) -> list[JobState]:
        return self.watcher.states(jobs)

    def cancel(self, *jobs: SubmittedJob) -> None:
        """``scancel -n NAME ID``: SLURM cancels the job only if it still has that name."""
        for job in jobs:
            by_name = ["-n", job.name] if job.name else []
            run_command(["scancel", *by_name, job.job_id], "cancelling jobs")
        self.watcher.soon()
