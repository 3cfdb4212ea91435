"""``select`` as a job of the site's scheduler: submitted here, run on a compute node,
followed until its selection is committed (or its error is known).

The job's folder is the selection's summary folder (``selection_folder.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
import time

from autopipec_hpc.active.selection import SelectionResult, published_potential, select_candidates
from autopipec_hpc.active.selection_claim import claim_selection, find_claim, release, set_folder
from autopipec_hpc.active.selection_folder import SelectionFolder, SelectionRequest, default_selection_dir
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import SchedulerError, SelectionError, one_line
from autopipec_hpc.files import fresh_dir
from autopipec_hpc.processes import die_with_local_controller
from autopipec_hpc.scheduler.base import SubmittedJob, job_name, state_with_reason
from autopipec_hpc.states import FINISHED, JobRole, JobState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import absolute_target


# -- select as a job of the site's scheduler ----------------------------------------------
# The job's files may trail the scheduler's word that it ended (a shared filesystem).
RESULT_GRACE_S = 15.0


def selects_in_a_job(site: SiteConfig) -> bool:
    """Whether ``select`` runs as a job of the site's scheduler. On a cluster it does: scoring
    100,000 candidates belongs on a compute node. The local site selects in the calling
    process: a local job would run on the same machine, only later and without live progress."""
    return site.scheduler != "local"


@dataclass(frozen=True)
class SelectionSubmission:
    """A submitted select job: what it was asked, its folder and its job."""

    request: SelectionRequest
    folder: SelectionFolder
    task: SubmittedJob


class SelectJob:
    """The select job's body: the request saved in its folder. The folder gets the summary
    once the selection is committed, or the job's error (``select.failed``)."""

    def __call__(self, folder: str) -> dict[str, Any]:
        die_with_local_controller()
        selection = SelectionFolder(folder)
        if selection.summary_file.exists():
            raise SelectionError(f"{selection.path} holds a finished selection; select again for a new one")
        selection.failure_file.unlink(missing_ok=True)  # a resubmission by hand starts clean
        db = claim = None
        try:
            database, request = SelectionRequest.load(folder)
            # The job's own handle, opened from its saved request: one per job.
            db = DatabaseManager(database, must_exist=True)
            # Submitted under a claim: a job whose claim was dropped (its submitter was
            # reckoned gone before the job was known) selects nothing.
            claim = find_claim(db, request.generation, request.claim or "")
            if claim is None:
                raise SelectionError(f"generation {request.generation}: this select job's claim "
                                     f"({request.claim}) is not in the database (dropped, or the selection "
                                     "was committed); nothing selected")
            result = select_candidates(db, request, notify=lambda message: print(message, flush=True),
                                       folder_made=selection, claim=claim)
        except Exception as exc:
            selection.record_failure(one_line(exc))
            if db is not None and claim is not None:
                release(db, claim)  # the next selection need not wait for this job to be reckoned ended
            raise
        return result.model_dump(mode="json")


def submit_selection(
    site: SiteConfig,
    db: DatabaseManager,
    request: SelectionRequest,
    notify: Callable[[str], None] | None = None,
) -> SelectionSubmission:
    """Check the published potential and the scheduler here, then submit one select job
    (``SelectJob``) with the site's ``select`` resources. Its folder, the summary folder
    (``selection_folder.py``), keeps the request, the job script and log."""
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    generation = request.generation
    potential = published_potential(db, generation)
    scheduler = scheduler_for(site)
    for warning in scheduler.check():
        say(f"warning: {warning}")
    # Claimed before the job exists, so that a second select (or a rerun of a killed loop)
    # finds it; the claim names the folder, whose job.json then names the job.
    claim = claim_selection(db, generation, site=site, again=request.again)
    try:
        target = request.out_dir.resolve() if request.out_dir else default_selection_dir(potential.parent.parent,
                                                                                         generation)
        folder = SelectionFolder(fresh_dir(target))
        claim = set_folder(db, claim, folder.path)
        request = replace(request, claim=claim.token)
        # The job opens the database from this string on its compute node.
        request.save(folder, absolute_target(db.target))
    except BaseException:
        release(db, claim)
        raise
    try:
        task = scheduler.submit(SelectJob(), str(folder.path), folder=folder, role=JobRole.SELECT,
                                name=job_name(generation, JobRole.SELECT, folder.path),
                                resources=site.select_resources)
    except BaseException as exc:
        folder.record_failure(f"not submitted: {one_line(exc)}")
        release(db, claim)
        raise
    task.save(folder.job_file)
    return SelectionSubmission(request, folder, task)


def read_selection(folder: SelectionFolder) -> SelectionResult:
    return SelectionResult.from_json(folder.summary_file.read_text())


def wait_for_selection(
    site: SiteConfig,
    folder: str | Path,
    timeout_s: float,
    poll_s: float = 2.0,
    notify: Callable[[str], None] | None = None,
) -> SelectionResult:
    """Block until the select job in ``folder`` has committed its selection and return it;
    SelectionError (one line: the job's error, or how it ended) if it ended without one,
    SchedulerError if it is still going after ``timeout_s``."""
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    selection = SelectionFolder(folder)
    task = SubmittedJob.load(selection.job_file)
    scheduler = scheduler_for(site)
    deadline = time.monotonic() + timeout_s
    ended_at: float | None = None
    last_state: JobState | None = None
    while True:
        if selection.summary_file.exists():
            return read_selection(selection)
        error = selection.failure()
        if error is not None:
            raise SelectionError(f"select job {task.job_id} failed: {error} (log {task.stderr})")
        [state] = scheduler.states([task])
        if state != last_state:
            say(f"select job {task.job_id}: {state_with_reason(scheduler, task, state)}")
            last_state = state
        if state in FINISHED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_S:
                raise SelectionError(f"select job {task.job_id} ended {state} without a selection"
                                     f"{_log_end(task.stderr)} (log {task.stderr})")
        if time.monotonic() > deadline:
            raise SchedulerError(f"select job {task.job_id} not finished after {timeout_s:.0f} s ({state}); "
                                 f"it keeps running: its summary will be {selection.summary_file}")
        time.sleep(poll_s)


def _log_end(path: Path) -> str:
    """The last line of a job's log of errors, as '': <line>' (a kill names itself there)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def run_selection(
    site: SiteConfig,
    db: DatabaseManager,
    request: SelectionRequest,
    timeout_s: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> SelectionResult:
    """``select`` where the site runs it (``selects_in_a_job``): in this process, or as a job
    that this call submits and waits for."""
    if not selects_in_a_job(site):
        published_potential(db, request.generation)  # named before anything is written
        claim = claim_selection(db, request.generation, site=site, again=request.again)
        try:
            return select_candidates(db, request, notify=notify, claim=claim)
        except BaseException:
            release(db, claim)
            raise
    say = notify or (lambda message: None)
    sub = submit_selection(site, db, request, notify=say)
    say(f"select job {sub.task.job_id} submitted ({sub.task.scheduler}); folder {sub.folder.path}")
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    return wait_for_selection(site, sub.folder.path, timeout, notify=say)
