"""Following one generation from the login node: its record, its jobs, its progress;
waiting for it, cancelling it, and bringing its record in line with its jobs.

Everything works from the run folder and the database alone, so a new process (or
a later login) can re-attach to a generation submitted earlier. ``Generation`` reads
the run folder once (spec, jobs) and asks job states through the site's one
scheduler object, whose watcher batches and backs off its queries.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autopipec_hpc import registry
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import (DatabaseBusyError, SchedulerError, TrainingDivergenceError, TrainingFailedError,
                                  ValidationRejectedError, WaitInterrupted, one_line)
from autopipec_hpc.pacemaker.files import LiveProgress
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.run_folder import RunFolder, RunSpec, attempt_number, latest_generation_folder
from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.scheduler.base import Scheduler, SubmittedJobs, state_with_reason
from autopipec_hpc.states import FINISHED, JobRole, JobState, RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.records import TrainingRecord

log = logging.getLogger(__name__)


FAILURE_GRACE_S = 30.0
_ROLE_NAMES = {JobRole.TRAIN: "training", JobRole.EVALUATE: "evaluation", JobRole.VALIDATE: "validation"}
# How long a waiter bears a scheduler that cannot say how its jobs are (accounting down).
SCHEDULER_PATIENCE_S = 600.0
# How often a waiter reads the record and progress.json (the watcher decides when the scheduler is asked).
WAIT_POLL_S = 2.0
CANCEL_POLL_S = 0.5
# A RUNNING record this old whose training job waits in the queue again was requeued by the
# scheduler; a younger one may be a job that just started while accounting still says PENDING.
REQUEUE_EVIDENCE_S = 30.0


def _plain(states: dict[JobRole, JobState]) -> dict[str, str]:
    """Job states as plain strings, for messages."""
    return {str(role): str(state) for role, state in states.items()}


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


class Generation:
    """One generation, loaded once: its spec, its submitted jobs (None before they were
    submitted), the site's scheduler and the database."""

    def __init__(self, spec: RunSpec, jobs: SubmittedJobs | None, scheduler: Scheduler,
                 db: DatabaseManager, follow: bool = True) -> None:
        self.spec = spec
        self.jobs = jobs
        self.scheduler = scheduler
        self.db = db
        if jobs is not None and follow:
            scheduler.watcher.register(*jobs.all)  # asked about together with every other followed job

    @classmethod
    def open(cls, run_dir: str | Path, db: DatabaseManager | None = None, follow: bool = True) -> "Generation":
        """The generation of ``run_dir``; with ``follow`` False (a final record's), its jobs
        are not registered with the watcher, so no query ever names them."""
        spec = RunSpec.load(run_dir)
        folder = RunFolder(run_dir)
        jobs = SubmittedJobs.load(run_dir) if folder.jobs_file.exists() else None
        return cls(spec, jobs, scheduler_for(spec.site), db or DatabaseManager(spec.database, must_exist=True), follow)

    @classmethod
    def find(cls, site: SiteConfig, generation: int, database: str | None = None) -> "Generation":
        return cls.open(find_run(site, generation, database))

    @property
    def number(self) -> int:
        return self.spec.generation

    @property
    def folder(self) -> RunFolder:
        return self.spec.folder

    def record(self) -> TrainingRecord | None:
        # As this run ended: a failed retrain of a published generation puts its record back.
        return self.db.run_record(self.number, self.spec.run_dir)

    def job_states(self) -> dict[JobRole, JobState]:
        """Every job's state (train, evaluate[, validate]): one watcher query where one is due, else its cache."""
        if self.jobs is None:
            raise SchedulerError(f"{self.spec.run_dir} has no {self.folder.jobs_file.name}: nothing was submitted from it")
        return {job.role: state for job, state in zip(self.jobs.all, self.scheduler.states(self.jobs.all))}

    def progress(self) -> GenerationProgress | None:
        """The newest attempt's progress, or None before pacemaker reported an iteration."""
        for attempt in reversed(self.folder.attempts()):
            progress = LiveProgress.load(attempt)
            if progress is not None:
                return GenerationProgress(self.number, attempt_number(attempt), progress)
        return None

    def wait(self, timeout_s: float, poll_s: float = WAIT_POLL_S,
             on_progress: Callable[[GenerationProgress], None] | None = None) -> TrainingRecord:
        """Block until the record is final and the jobs are done; raise the pipeline's error
        if it failed, SchedulerError if nothing conclusive happened within ``timeout_s``.
        ``on_progress`` hears each new state of the fit while it runs. The record and the
        progress are read every ``poll_s``; the jobs' states come from the watcher. A Ctrl-C
        ends the wait only (WaitInterrupted): the jobs run in sessions of their own and go on."""
        try:
            return self._wait(timeout_s, poll_s, on_progress)
        except KeyboardInterrupt as exc:
            if isinstance(exc, WaitInterrupted):
                raise
            raise WaitInterrupted(
                f"generation {self.number} goes on ({self.spec.site.scheduler} jobs are not stopped by a Ctrl-C): "
                f"follow it with `autopipec-hpc status --generation {self.number}` (a rerun of `loop` waits for it), "
                f"stop it with `autopipec-hpc cancel --generation {self.number}`"
            ) from None

    def _wait(self, timeout_s: float, poll_s: float,
              on_progress: Callable[[GenerationProgress], None] | None) -> TrainingRecord:
        deadline = time.monotonic() + timeout_s
        failed_at: float | None = None
        last_seen: tuple[int, float] | None = None
        last_status: RecordState | None = None
        unanswered_since: float | None = None
        while True:
            if on_progress is not None:
                current = self.progress()
                if current is not None and (current.attempt, current.progress.updated_at) != last_seen:
                    last_seen = (current.attempt, current.progress.updated_at)
                    on_progress(current)
            try:
                record = self.record()
            except DatabaseBusyError:
                time.sleep(poll_s)  # a waiter is patient with a busy database; the deadline still holds
                if time.monotonic() > deadline:
                    raise
                continue
            status = record.status if record is not None else None
            if status != last_status:
                self.scheduler.watcher.soon()  # a record that moved: the jobs are about to
                last_status = status
            try:
                states = self.job_states()
                unanswered_since = None
            except SchedulerError:
                # Accounting down for a while (slurmdbd restarting) is waited out, bounded:
                # a scheduler that never answers must not hang the waiter.
                unanswered_since = unanswered_since or time.monotonic()
                if time.monotonic() - unanswered_since > SCHEDULER_PATIENCE_S or time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)
                continue
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
                record = self.reconcile()
                if record is not None and record.status.is_final:
                    break
            if time.monotonic() > deadline:
                raise SchedulerError(
                    f"generation {self.number} not finished after {timeout_s:.0f} s "
                    f"(record {record.status if record else 'missing'}, jobs {_plain(states)}); "
                    f"it keeps running: `autopipec-hpc status --generation {self.number}`"
                )
            time.sleep(poll_s)
        assert record is not None
        if record.status == RecordState.REJECTED:
            raise ValidationRejectedError(f"generation {self.number} REJECTED, not published: {record.reason}")
        if record.status == RecordState.DIVERGED:
            raise TrainingDivergenceError(f"generation {self.number} diverged: {record.reason}")
        if record.status in (RecordState.FAILED, RecordState.CANCELLED):
            raise TrainingFailedError(f"generation {self.number} {record.status}: {record.reason}",
                                      log_tail=record.log_tail)
        return record

    def cancel(self, settle_s: float = 60.0) -> dict[JobRole, JobState]:
        """Cancel its jobs, record CANCELLED (whenever the cancel lands before another final
        state), wait (bounded) for the jobs to end; returns the job states."""
        self.folder.cancel_marker.touch()
        if self.jobs is not None:
            self.scheduler.cancel(*reversed(self.jobs.all))
        self.db.update_record(self.number, self.spec.run_dir, RecordState.CANCELLED, reason="cancelled by user")
        if self.jobs is None:
            return {}
        deadline = time.monotonic() + settle_s
        states = self.job_states()
        while any(s not in FINISHED for s in states.values()) and time.monotonic() < deadline:
            time.sleep(CANCEL_POLL_S)
            states = self.job_states()
        return states

    def reconcile(self, record: TrainingRecord | None = None) -> TrainingRecord | None:
        """Bring the record in line with the jobs: a record SUBMITTED or RUNNING whose jobs
        have all ended (killed, node lost) becomes FAILED with the reason, or CANCELLED
        where its training job was cancelled (by hand too), so nobody sees, or is blocked
        by, a state that is not true. A record whose scheduler cannot answer is left as it is."""
        record = record or self.record()
        if record is None or not record.status.is_active or record.run_dir is None:
            return record
        if Path(record.run_dir) != self.spec.path:
            return record  # the generation is another run folder's now
        if self.jobs is None:
            return _submitter_gone(self.db, record)
        jobs = self.jobs
        try:
            states = self.job_states()
        except SchedulerError as exc:
            log.info("generation %s: cannot ask the scheduler (%s); record left as it is", self.number, exc)
            return record
        if record.status == RecordState.RUNNING and states[JobRole.TRAIN] == JobState.PENDING:
            return _requeued(self.db, record, jobs)
        if any(state not in FINISHED for state in states.values()):
            return record
        verdict = "training finished" if self.folder.train_verdict.exists() else "training left no verdict"
        reason = ("its jobs ended without a final record: " + ", ".join(
            f"{_ROLE_NAMES[job.role]} job {job.job_id} {states[job.role]}" for job in jobs.all) + f" ({verdict})")
        # Training cancelled outside autopipec-hpc (`scancel` by hand, a deadline), or the
        # evaluation or validation cancelled while it ran (its stop marker; one cancelled while
        # it waited never ran, and its generation FAILED): a cancel is CANCELLED whenever and
        # however it lands. The job wrote nothing on the signal: only the scheduler knows a cancel.
        stopped = any(states.get(role) == JobState.CANCELLED and self.folder.stop_marker(role).exists()
                      for role in (JobRole.EVALUATE, JobRole.VALIDATE))
        cancelled = states[JobRole.TRAIN] == JobState.CANCELLED or stopped
        outcome = RecordState.CANCELLED if cancelled else RecordState.FAILED
        if outcome == RecordState.FAILED:
            reason += _own_errors(jobs, states)
        orphan = _publication_of(self.spec)
        if orphan is not None:
            # Published, then killed before SUCCEEDED was written (publish_and_record's
            # last milliseconds): the record is about to say FAILED, so the potential
            # must not stay published.
            registry.discard(orphan)
            reason += "; its publication, which never got its SUCCEEDED record, was taken back"
        registry.discard(registry.validating_dir(self.spec.output_dir, self.number, self.spec.path))  # never published
        self.db.update_record(self.number, record.run_dir, outcome, reason=reason)
        return self.record()

    def describe_jobs(self) -> str:
        """The jobs as `status` shows them: ids, states, and why a pending one waits; what
        went wrong where the scheduler cannot answer."""
        if self.jobs is None:
            return "not submitted"
        try:
            parts = []
            for role, state in self.job_states().items():
                job = self.jobs.by_role(role)
                parts.append(f"{job.job_id} {state_with_reason(self.scheduler, job, state)}")
            return " / ".join(parts)
        except (SchedulerError, OSError, ValueError) as exc:
            return f"unknown: {one_line(exc)[:120]}"


def _own_errors(jobs: SubmittedJobs, states: dict[JobRole, JobState]) -> str:
    """What the failed jobs wrote as their own last error (a full disk, a traceback's
    last line), as '; <role> job: <error>' each: the cause, not only the state."""
    parts = []
    for role, state in states.items():
        if state not in (JobState.FAILED, JobState.UNKNOWN):
            continue
        error = jobs.by_role(role).last_error()
        if error:
            parts.append(f"; {role} job's last error: {error}")
    return "".join(parts)


def _submitter_gone(db: DatabaseManager, record: TrainingRecord) -> TrainingRecord | None:
    """A record claimed on this machine whose submitting process ended before any job was
    submitted (no jobs.json): FAILED, so it blocks nobody."""
    claimer = str(record.values.get("claimed_by", ""))
    host, _, pid = claimer.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        assert record.run_dir is not None
        db.update_record(record.generation, record.run_dir, RecordState.FAILED,
                         reason=f"the submitting process ({claimer}) ended before its jobs were submitted")
    return db.get_record(record.generation)


@dataclass(frozen=True)
class FollowedRecord:
    """A record and its generation's handle (None where its run folder cannot be read:
    ``problem`` says why)."""

    record: TrainingRecord
    generation: Generation | None
    problem: str = ""

    def describe_jobs(self) -> str:
        """As ``Generation.describe_jobs``; for a final record only its job ids: what its
        jobs did is decided, and asking the scheduler (slow, or hanging with slurmdbd)
        would tell nothing the record does not."""
        if self.generation is not None and self.record.status.is_final:
            jobs = self.generation.jobs
            return "not submitted" if jobs is None else f"{' / '.join(j.job_id for j in jobs.all)} (record final: not asked)"
        if self.generation is not None:
            return self.generation.describe_jobs()
        return f"unknown: {self.problem}" if self.problem else "not submitted"

    def progress(self) -> GenerationProgress | None:
        return self.generation.progress() if self.generation is not None else None


def follow_records(db: DatabaseManager, generation: int | None = None) -> list[FollowedRecord]:
    """The records (one generation's, or all), each with its handle and, if active, first
    brought in line with its jobs. Every run folder is read once and every job registered
    before the first state is asked, so all of them are asked in one query."""
    records = db.records() if generation is None else [r for r in [db.get_record(generation)] if r]
    followed = []
    for record in records:
        handle, problem = None, ""
        if record.run_dir is not None and RunFolder(record.run_dir).spec_file.exists():
            try:
                handle = Generation.open(record.run_dir, db, follow=record.status.is_active)
            except (SchedulerError, OSError, ValueError) as exc:
                problem = one_line(exc)[:120]
        followed.append(FollowedRecord(record, handle, problem))
    out = []
    for item in followed:
        record = item.record
        if record.status.is_active:
            record = (item.generation.reconcile(record) if item.generation is not None
                      else reconcile_generation(db, record.generation)) or record
        out.append(FollowedRecord(record, item.generation, item.problem))
    return out


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


def reconcile_generation(db: DatabaseManager, generation: int) -> TrainingRecord | None:
    """``Generation.reconcile`` for the record of ``generation`` (it names the run folder)."""
    record = db.get_record(generation)
    if record is None or not record.status.is_active or record.run_dir is None:
        return record
    if not RunFolder(record.run_dir).jobs_file.exists():
        return _submitter_gone(db, record)
    try:
        handle = Generation.open(record.run_dir, db)
    except (SchedulerError, OSError, ValueError) as exc:
        log.info("generation %s: cannot read its run folder (%s); record left as it is", generation, exc)
        return record
    return handle.reconcile(record)


# The module-level calls of the Python API and the tests: each one handle, one call.
def wait_for_generation(run_dir: Path, timeout_s: float, poll_s: float = WAIT_POLL_S,
                        on_progress: Callable[[GenerationProgress], None] | None = None) -> TrainingRecord:
    return Generation.open(run_dir).wait(timeout_s, poll_s, on_progress)


def cancel_generation(run_dir: Path, settle_s: float = 60.0) -> dict[JobRole, JobState]:
    return Generation.open(run_dir).cancel(settle_s)


def job_states(run_dir: Path) -> dict[JobRole, JobState]:
    return Generation.open(run_dir).job_states()


def describe_jobs(run_dir: Path) -> str:
    try:
        return Generation.open(run_dir).describe_jobs()
    except (SchedulerError, OSError, ValueError) as exc:
        return f"unknown: {one_line(exc)[:120]}"


def generation_progress(run_dir: Path) -> GenerationProgress | None:
    try:
        return Generation.open(run_dir).progress()
    except (SchedulerError, OSError, ValueError):
        return None


def _publication_of(spec: RunSpec) -> Path | None:
    """The published folder of ``spec``'s generation if this very run published it
    (its metrics name one of the run's attempts); None otherwise."""
    final = registry.potentials_root(spec.output_dir) / str(spec.generation)
    try:
        attempt = str(json.loads((final / registry.METRICS).read_text()).get("attempt", ""))
    except (OSError, ValueError):
        return None
    return final if Path(attempt).parent == spec.path else None


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
                         reason=f"requeued by the scheduler: training job {jobs.train.job_id} waits in the queue again "
                                f"(attempt {record.values.get('attempt', '?')} was interrupted)")
        return db.get_record(record.generation)
