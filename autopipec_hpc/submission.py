"""Submit a generation, follow it, cancel it: the calls behind `submit`, `status`, `cancel`.

Everything here works from the run folder alone, so a new process (or a later
login) can re-attach to a generation submitted earlier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.dataset_prep import DatasetManifest
from autopipec_hpc.db import DatabaseManager, TrainingRecord
from autopipec_hpc.errors import SchedulerError, TrainingDivergenceError, TrainingFailedError
from autopipec_hpc.jobs import CANCEL_MARKER, RunSpec, prepare_run
from autopipec_hpc.scheduler import FINISHED, SubmittedJobs, scheduler_for

FINAL_RECORD_STATES = {"SUCCEEDED", "FAILED", "DIVERGED", "CANCELLED"}
FAILURE_GRACE_S = 30.0


@dataclass(frozen=True)
class Submission:
    spec: RunSpec
    manifest: DatasetManifest
    jobs: SubmittedJobs


def submit_generation(
    database: str,
    site: SiteConfig,
    config: TrainConfig,
    generation: int | None = None,
    force: bool = False,
) -> Submission:
    """Prepare the datasets here, then submit training and its dependent evaluation."""
    from autopipec_hpc.preflight import run_preflight

    spec, manifest = prepare_run(database, site, config, generation, force)
    scheduler = scheduler_for(site)
    try:
        run_preflight(spec, manifest)
        jobs = scheduler.submit(spec)
    except BaseException as exc:
        DatabaseManager(spec.database).write_record(
            spec.generation, "FAILED", reason=f"not submitted: {exc}"
        )
        raise
    DatabaseManager(spec.database).write_record(
        spec.generation, "SUBMITTED",
        values={"scheduler": jobs.scheduler, "train_job": jobs.train, "evaluate_job": jobs.evaluate},
    )
    return Submission(spec, manifest, jobs)


def find_run(site: SiteConfig, generation: int, database: str | None = None) -> Path:
    """The run folder of ``generation``: from its record, else the newest in the work folder."""
    db = DatabaseManager(database or site.database)
    record = db.get_record(generation)
    if record is not None and record.values.get("run_dir"):
        return Path(record.values["run_dir"])
    candidates = sorted(Path(site.work_dir).glob(f"gen-{generation:04d}*"))
    if not candidates:
        raise SchedulerError(f"no run folder for generation {generation} under {site.work_dir}")
    return candidates[-1]


def job_states(run_dir: Path) -> dict[str, str]:
    spec = RunSpec.load(run_dir)
    jobs = SubmittedJobs.load(run_dir)
    scheduler = scheduler_for(spec.site_config)
    return {which: scheduler.state(jobs, which) for which in ("train", "evaluate")}


def wait_for_generation(run_dir: Path, timeout_s: float, poll_s: float = 1.0) -> TrainingRecord:
    """Block until the record is final and the jobs are done; raise the pipeline's error
    if it failed, SchedulerError if nothing conclusive happened within ``timeout_s``."""
    spec = RunSpec.load(run_dir)
    db = DatabaseManager(spec.database)
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    while True:
        record = db.get_record(spec.generation)
        states = job_states(run_dir)
        jobs_done = all(s in FINISHED for s in states.values())
        final = record is not None and record.status in FINAL_RECORD_STATES
        if final and jobs_done:
            break
        if final and record.status != "SUCCEEDED":
            # Give the other job a moment to end (a local evaluation noticing, SLURM
            # removing a dependent job); a cluster that leaves it pending must not hang us.
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > FAILURE_GRACE_S:
                break
        elif jobs_done:
            # Both jobs ended but nobody wrote a final record (killed hard, node lost).
            db.write_record(spec.generation, "FAILED", reason=f"jobs ended without a result: {states}")
            record = db.get_record(spec.generation)
            break
        if time.monotonic() > deadline:
            raise SchedulerError(
                f"generation {spec.generation} not finished after {timeout_s:.0f} s "
                f"(record {record.status if record else 'missing'}, jobs {states}); "
                f"it keeps running: `autopipec-hpc status --generation {spec.generation}`"
            )
        time.sleep(poll_s)
    assert record is not None
    if record.status == "DIVERGED":
        raise TrainingDivergenceError(f"generation {spec.generation} diverged: {record.reason}")
    if record.status in ("FAILED", "CANCELLED"):
        raise TrainingFailedError(
            f"generation {spec.generation} {record.status}: {record.reason}",
            log_tail=str(record.data.get("log_tail", "")),
        )
    return record


def cancel_generation(run_dir: Path, settle_s: float = 60.0) -> dict[str, str]:
    """Cancel both jobs, wait (bounded) for them to end, record CANCELLED; returns job states."""
    spec = RunSpec.load(run_dir)
    (Path(run_dir) / CANCEL_MARKER).touch()
    jobs = SubmittedJobs.load(run_dir)
    scheduler_for(spec.site_config).cancel(jobs)
    DatabaseManager(spec.database).write_record(spec.generation, "CANCELLED", reason="cancelled by user")
    deadline = time.monotonic() + settle_s
    states = job_states(Path(run_dir))
    while any(s not in FINISHED for s in states.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        states = job_states(Path(run_dir))
    return states
