"""The SLURM scheduler: submitit's SlurmExecutor, built from a SiteConfig.

Training goes to the site's training partition (with its GPUs); evaluation
follows with ``afterok`` and ``--kill-on-invalid-dep=yes``, so a failed
training removes it instead of leaving it pending forever. Job state is read
with ``sacct`` under a timeout: a cluster without accounting gives a clear
error, never a hang. The scripts that run are kept in the run folder
(``RunFolder.job_script``) and can be resubmitted by hand.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import submitit

from autopipec_hpc.config import JobResources, SiteConfig
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc.jobs import EvaluateJob, TrainJob
from autopipec_hpc.templates import template_environment
from autopipec_hpc.run_folder import RunSpec, submitted_pickle_name
from autopipec_hpc.scheduler.base import SubmittedJobs, SubmittedTask, Task, TaskFolder
from autopipec_hpc.states import JobState

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


def sacct_state(job_id: str, name: str | None = None) -> JobState:
    """The state of ``job_id`` (of the job named ``name``: accounting may also list an older
    job of the same id, from before the cluster was restarted)."""
    by_name = ["--name", name] if name else []
    out = run_command(["sacct", "-n", "-X", "-P", "-j", job_id, *by_name, "-o", "State"], "reading job state")
    lines = [line.split()[0] for line in out.splitlines() if line.strip()]
    if not lines:
        return JobState.UNKNOWN  # accounting has not seen it yet
    return STATE_MAP.get(lines[-1].rstrip("+"), JobState.UNKNOWN)


def setup_lines(site: SiteConfig, run_dir: Path, role: str, folder: Path) -> list[str]:
    """The compute-node preamble, from job_templates/slurm_setup.sh.j2."""
    template = template_environment().get_template("slurm_setup.sh.j2")
    text = template.render(site=site, role=role, run_dir=str(run_dir), folder=str(folder),
                           submitted_pickle=str(Path(folder) / submitted_pickle_name(role)), quote=shlex.quote)
    return [line for line in text.splitlines() if line.strip()]


def keep_job_files(job: submitit.Job, folder: TaskFolder, role: str) -> None:
    """Keep a job's script and pickle beside its story: readable, and `sbatch <role>.sbatch`
    reruns the same job (the preamble gives a hand-submitted job id its pickle)."""
    shutil.copy2(job.paths.submitted_pickle, folder.submitted_pickle(role))
    shutil.copy2(job.paths.submission_file, folder.job_script(role))


class SlurmScheduler:
    name = "slurm"
    check_name = "SLURM with accounting"

    def __init__(self, site: SiteConfig) -> None:
        self.site = site

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

    def pending_reason(self, jobs: SubmittedJobs, which: str) -> str | None:
        try:
            out = run_command(["squeue", "-h", "-j", getattr(jobs, which), "-o", "%r"], "reading why a job waits")
        except SchedulerError:
            return None
        reason = out.strip().splitlines()[-1].strip() if out.strip() else ""
        return reason if reason and reason != "None" else None

    def job_preamble(self, run_dir: Path, role: str, folder: Path) -> list[str]:
        return setup_lines(self.site, run_dir, role, folder)

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

    def _run_executor(self, spec: RunSpec, role: str, res: JobResources, extra: dict[str, str]) -> submitit.SlurmExecutor:
        return self._executor(spec.folder.submitit_dir, f"autopipec-g{spec.generation}-{role}", role, spec.path,
                              res, extra)

    def submit(self, spec: RunSpec) -> SubmittedJobs:
        train = self._run_executor(spec, "train", self.site.train, {}).submit(TrainJob(), spec.run_dir)
        evaluate = self._run_executor(
            spec, "evaluate", self.site.evaluate,
            {"dependency": f"afterok:{train.job_id}", "kill-on-invalid-dep": "yes"},
        ).submit(EvaluateJob(), spec.run_dir)
        for role, job in (("train", train), ("evaluate", evaluate)):
            keep_job_files(job, spec.folder, role)
        jobs = SubmittedJobs(self.name, str(spec.folder.submitit_dir), str(train.job_id), str(evaluate.job_id))
        jobs.save(spec.path)
        return jobs

    def submit_task(self, task: Task, folder: TaskFolder, role: str, name: str,
                    resources: JobResources) -> SubmittedTask:
        executor = self._executor(folder.submitit_dir, name, role, folder.path, resources, {})
        job = executor.submit(task, str(folder.path))
        keep_job_files(job, folder, role)
        return SubmittedTask(self.name, str(folder.submitit_dir), str(job.job_id), role, name)

    def task_state(self, task: SubmittedTask) -> JobState:
        return sacct_state(task.job_id, task.name)

    def state(self, jobs: SubmittedJobs, which: str) -> JobState:
        return sacct_state(getattr(jobs, which))

    def cancel(self, jobs: SubmittedJobs) -> None:
        run_command(["scancel", jobs.evaluate, jobs.train], "cancelling jobs")
