"""Following one generation from the login node: its record, its jobs, its progress;
waiting for it, cancelling it, and bringing its record in line with its jobs.

Everything here works from the run folder and the database alone, so a new
process (or a later login) can re-attach to a generation submitted earlier.
"""

from __future__ import annotations

from autopipec_hpc.errors import one_line

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
import json
import logging
import socket
import time
from autopipec_hpc import registry
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import DatabaseBusyError, SchedulerError, TrainingDivergenceError, TrainingFailedError
from autopipec_hpc.pacemaker.files import LiveProgress
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.run_folder import RunFolder, RunSpec, attempt_number, latest_generation_folder
from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.scheduler.base import SubmittedJobs
from autopipec_hpc.states import FINISHED, JOB_ROLES, JobState, RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.records import TrainingRecord

log = logging.getLogger(__name__)


FAILURE_GRACE_S = 30.0


def find_run(site: SiteConfig, generation: int, database: str | None = None) -> Path:
    """The run folder of ``generation``: from its record, else the newest in the work folder."""
    db = DatabaseManager(database or site.database)
    record = db.get_record(generation)
    if record is not None and record.run_dir is not None:
        return record.run_dir
    latest = latest_generation_folder(site.work_dir, generation)
    if latest is None:
        raise SchedulerError(f"no run folder for generation {generation} under {site.work_dir}")
    return latest.path


def job_states(run_dir: Path) -> dict[str, JobState]:
    spec = RunSpec.load(run_dir)
    jobs = SubmittedJobs.load(run_dir)
    scheduler = scheduler_for(spec.site_config)
    return {which: scheduler.state(jobs, which) for which in JOB_ROLES}


def _plain(states: dict[str, JobState]) -> dict[str, str]:
    """Job states as plain strings, for messages."""
    return {which: str(state) for which, state in states.items()}


@dataclass(frozen=True)
class GenerationProgress:
    """The live state of a generation's fit, read from its run folder."""

    generation: int
    attempt: int
    progress: LiveProgress

    def describe(self) -> str:
        p = self.progress
        parts = [f"generation {self.generation}, attempt {self.attempt}: iteration {min(p.iteration, p.maxiter)}/{p.maxiter}",
                 f"loss {p.loss:.3e}", f"train E {p.rmse_energy_mev:.2f} meV/at, F {p.rmse_force_mev:.1f} meV/A"]
        if p.test_rmse_energy_mev is not None and p.test_rmse_force_mev is not None:
            parts.append(f"test E {p.test_rmse_energy_mev:.2f}, F {p.test_rmse_force_mev:.1f}")
        if p.s_per_iteration is not None:
            parts.append(f"{p.s_per_iteration:.2f} s/iteration")
        if p.eta_s is not None:
            parts.append(f"ETA {_duration(p.eta_s)}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def generation_progress(run_dir: Path) -> GenerationProgress | None:
    """The newest attempt's progress, or None before pacemaker reported an iteration."""
    try:
        spec = RunSpec.load(run_dir)
    except (OSError, ValueError):
        return None
    for attempt in reversed(RunFolder(run_dir).attempts()):
        progress = LiveProgress.load(attempt)
        if progress is not None:
            return GenerationProgress(spec.generation, attempt_number(attempt), progress)
    return None


def wait_for_generation(
    run_dir: Path,
    timeout_s: float,
    poll_s: float = 1.0,
    on_progress: Callable[[GenerationProgress], None] | None = None,
) -> TrainingRecord:
    """Block until the record is final and the jobs are done; raise the pipeline's error
    if it failed, SchedulerError if nothing conclusive happened within ``timeout_s``.
    ``on_progress`` hears each new state of the fit while it runs."""
    spec = RunSpec.load(run_dir)
    db = DatabaseManager(spec.database)
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    last_seen: tuple[int, float] | None = None
    while True:
        if on_progress is not None:
            current = generation_progress(Path(run_dir))
            if current is not None and (current.attempt, current.progress.updated_at) != last_seen:
                last_seen = (current.attempt, current.progress.updated_at)
                on_progress(current)
        try:
            record = db.get_record(spec.generation)
        except DatabaseBusyError:
            time.sleep(poll_s)  # a waiter is patient with a busy database; the deadline still holds
            if time.monotonic() > deadline:
                raise
            continue
        states = job_states(run_dir)
        jobs_done = all(s in FINISHED for s in states.values())
        final = record is not None and record.status.is_final
        if final and jobs_done:
            break
        if final and record.status != RecordState.SUCCEEDED:
            # Give the other job a moment to end (a local evaluation noticing, SLURM
            # removing a dependent job); a cluster that leaves it pending must not hang us.
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > FAILURE_GRACE_S:
                break
        elif jobs_done:
            # Both jobs ended but nobody wrote a final record (killed hard, node lost).
            record = reconcile_generation(db, spec.generation)
            if record is not None and record.status.is_final:
                break
        if time.monotonic() > deadline:
            raise SchedulerError(
                f"generation {spec.generation} not finished after {timeout_s:.0f} s "
                f"(record {record.status if record else 'missing'}, jobs {_plain(states)}); "
                f"it keeps running: `autopipec-hpc status --generation {spec.generation}`"
            )
        time.sleep(poll_s)
    assert record is not None
    if record.status == RecordState.DIVERGED:
        raise TrainingDivergenceError(f"generation {spec.generation} diverged: {record.reason}")
    if record.status in (RecordState.FAILED, RecordState.CANCELLED):
        raise TrainingFailedError(
            f"generation {spec.generation} {record.status}: {record.reason}",
            log_tail=record.log_tail,
        )
    return record


def cancel_generation(run_dir: Path, settle_s: float = 60.0) -> dict[str, JobState]:
    """Cancel both jobs, record CANCELLED (whenever the cancel lands before another final
    state), wait (bounded) for the jobs to end; returns the job states."""
    spec = RunSpec.load(run_dir)
    db = DatabaseManager(spec.database)
    folder = RunFolder(run_dir)
    folder.cancel_marker.touch()
    states: dict[str, JobState] = {}
    if folder.jobs_file.exists():
        jobs = SubmittedJobs.load(run_dir)
        scheduler_for(spec.site_config).cancel(jobs)
    db.update_record(spec.generation, spec.run_dir, RecordState.CANCELLED, reason="cancelled by user")
    if folder.jobs_file.exists():
        deadline = time.monotonic() + settle_s
        states = job_states(Path(run_dir))
        while any(s not in FINISHED for s in states.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            states = job_states(Path(run_dir))
    return states


def reconcile_generation(db: DatabaseManager, generation: int) -> TrainingRecord | None:
    """Bring the record of ``generation`` in line with its jobs: a record SUBMITTED or
    RUNNING whose jobs have all ended (killed, node lost) becomes FAILED with the reason,
    or CANCELLED where its training job was cancelled (by hand too), so nobody sees, or
    is blocked by, a state that is not true.
    A record whose scheduler cannot answer is left as it is."""
    record = db.get_record(generation)
    if record is None or not record.status.is_active or record.run_dir is None:
        return record
    folder = RunFolder(record.run_dir)
    if not folder.jobs_file.exists():
        claimer = str(record.values.get("claimed_by", ""))
        host, _, pid = claimer.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            db.update_record(generation, record.run_dir, RecordState.FAILED,
                             reason=f"the submitting process ({claimer}) ended before its jobs were submitted")
        return db.get_record(generation)
    try:
        spec = RunSpec.load(record.run_dir)
        jobs = SubmittedJobs.load(record.run_dir)
        scheduler = scheduler_for(spec.site_config)
        states = {which: scheduler.state(jobs, which) for which in JOB_ROLES}
    except (SchedulerError, OSError, ValueError) as exc:
        log.info("generation %s: cannot ask the scheduler (%s); record left as it is", generation, exc)
        return record
    if record.status == RecordState.RUNNING and states["train"] == JobState.PENDING:
        return _requeued(db, record, jobs)
    if any(state not in FINISHED for state in states.values()):
        return record
    verdict = "training finished" if folder.train_verdict.exists() else "training left no verdict"
    reason = (f"its jobs ended without a final record: training job {jobs.train} {states['train']}, "
              f"evaluation job {jobs.evaluate} {states['evaluate']} ({verdict})")
    # Training cancelled outside autopipec-hpc (`scancel` by hand, a deadline): a cancel
    # is CANCELLED whenever and however it lands. Its job wrote nothing on the signal,
    # since only the scheduler knows a cancel from a requeue.
    outcome = RecordState.CANCELLED if states["train"] == JobState.CANCELLED else RecordState.FAILED
    orphan = _publication_of(spec)
    if orphan is not None:
        # Published, then killed before SUCCEEDED was written (publish_and_record's
        # last milliseconds): the record is about to say FAILED, so the potential
        # must not stay published.
        registry.discard(orphan)
        reason += "; its publication, which never got its SUCCEEDED record, was taken back"
    db.update_record(generation, record.run_dir, outcome, reason=reason)
    return db.get_record(generation)


def _publication_of(spec: RunSpec) -> Path | None:
    """The published folder of ``spec``'s generation if this very run published it
    (its metrics name one of the run's attempts); None otherwise."""
    final = registry.potentials_root(spec.output_dir) / str(spec.generation)
    try:
        attempt = str(json.loads((final / registry.METRICS).read_text()).get("attempt", ""))
    except (OSError, ValueError):
        return None
    return final if Path(attempt).parent == spec.path else None


# A RUNNING record this old whose training job waits in the queue again was requeued
# by the scheduler; a younger one may be a job that just started while accounting
# still says PENDING.
REQUEUE_EVIDENCE_S = 30.0


def _requeued(db: DatabaseManager, record: TrainingRecord, jobs: SubmittedJobs) -> TrainingRecord | None:
    """A RUNNING record whose training job is PENDING again: the scheduler requeued it
    (a node lost or set down, preemption, `scontrol requeue`): SUBMITTED with that
    reason, never FAILED, so the record says what the job does. Written under the
    records' lock only if the record is still the one read (the same attempt, RUNNING),
    so a requeued attempt that starts meanwhile and writes RUNNING is not overwritten."""
    if time.time() - float(record.values.get("updated", 0.0)) < REQUEUE_EVIDENCE_S:
        return record
    assert record.run_dir is not None
    with db.locked():
        now = db.get_record(record.generation)
        if now is None or now.status != RecordState.RUNNING or now.values.get("attempt") != record.values.get("attempt"):
            return now
        db.update_record(record.generation, record.run_dir, RecordState.SUBMITTED,
                         reason=f"requeued by the scheduler: training job {jobs.train} waits in the queue again "
                                f"(attempt {record.values.get('attempt', '?')} was interrupted)")
        return db.get_record(record.generation)


def describe_jobs(run_dir: Path) -> str:
    """The jobs of a run as `status` shows them: ids, states, and why a pending one
    waits; what went wrong where the scheduler cannot answer."""
    folder = RunFolder(run_dir)
    if not folder.jobs_file.exists():
        return "not submitted"
    try:
        spec = RunSpec.load(run_dir)
        jobs = SubmittedJobs.load(run_dir)
        scheduler = scheduler_for(spec.site_config)
        parts = []
        for which in JOB_ROLES:
            state = scheduler.state(jobs, which)
            text = f"{getattr(jobs, which)} {state}"
            if state in (JobState.PENDING, JobState.UNKNOWN):
                reason = scheduler.pending_reason(jobs, which)
                text += f" ({reason})" if reason else ""
            parts.append(text)
        return " / ".join(parts)
    except (SchedulerError, OSError, ValueError) as exc:
        return f"unknown: {one_line(exc)[:120]}"
