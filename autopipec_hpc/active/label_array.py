"""``label`` as a job array of the site's scheduler: the login side.

It assigns the DFT_REQUESTED rows to tasks (``structures_per_task`` each), writes the label
folder (``label_folder.py``), submits one array (SLURM ``--array`` with the site's ``label:``
resources and the labeller's setup lines; locally one process per task: DFT never runs in
this process), follows it, reconciles the rows of ended tasks that a dead task left
LABELLING back to DFT_REQUESTED, and sums the step up from the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autopipec_hpc.active.label_folder import LabelFolder, LabelRequest, LabelSummary, default_label_dir
from autopipec_hpc.active.label_job import LabelTask
from autopipec_hpc.active.labeller_config import LabellerConfig
from autopipec_hpc.active.labelling import recover_labels
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import LabellingError, SchedulerError, one_line
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.scheduler.base import SubmittedJob, job_name
from autopipec_hpc.states import FINISHED, JobRole, JobState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import absolute_target, is_url

log = logging.getLogger(__name__)

# How long the summary waits for the rows of ended tasks to settle (see wait_for_labels).
SETTLE_S = 15.0


@dataclass(frozen=True)
class LabelSubmission:
    folder: LabelFolder
    request: LabelRequest
    jobs: list[SubmittedJob]


def labeller_site(site: SiteConfig, labeller: LabellerConfig) -> SiteConfig:
    """The site whose job scripts also run the labeller's setup lines (module load, ...)."""
    return site.model_copy(update={"setup": [*site.setup, *labeller.setup]}) if labeller.setup else site


def reconcile_labels(db: DatabaseManager, site: SiteConfig | None) -> list[int]:
    """LABELLING rows whose label task has ended (asked of the scheduler, as ``status`` asks
    for training jobs) go back to DFT_REQUESTED, or LABEL_FAILED where their task died on
    them MAX_LABEL_DEATHS times; rows held by a process (the in-process labeller) by its pid
    or lease (``recover_labels``). Under the records' lock; the ids back to DFT_REQUESTED."""
    from autopipec_hpc.scheduler import scheduler_for

    returned: list[int] = []
    held = [row for row in db.iter_rows(status=StructureStatus.LABELLING) if row.get("label_folder")]
    if held and site is not None:
        jobs: dict[str, SubmittedJob] = {}
        for folder in {str(row.get("label_folder")) for row in held}:
            for job in LabelFolder(folder).jobs():
                jobs[job.job_id] = job
        wanted = sorted({str(row.get("label_job")) for row in held} & set(jobs))
        try:
            states = dict(zip(wanted, scheduler_for(site).states([jobs[j] for j in wanted])))
        except SchedulerError as exc:
            log.warning("label tasks cannot be asked (%s); their rows stay LABELLING", one_line(exc))
            states = {}
        with db.locked():
            for row in held:
                state = states.get(str(row.get("label_job")))
                if state in FINISHED:
                    current = db.get_row(row.id)
                    if current.get("status") == StructureStatus.LABELLING and \
                            str(current.get("label_job")) == str(row.get("label_job")):
                        now = db.release_label(row.id, error=f"its label task {row.get('label_job')} ended {state}",
                                               died=True)
                        if now == StructureStatus.DFT_REQUESTED:
                            returned.append(row.id)
    returned += recover_labels(db)[0]
    return returned


@dataclass(frozen=True)
class LabellingNow:
    """Rows one label folder's tasks hold now (LABELLING): what ``status`` shows of them."""

    folder: str
    jobs: tuple[str, ...]
    rows: int


def labelling_now(db: DatabaseManager, site: SiteConfig | None) -> list[LabellingNow]:
    """The LABELLING rows by label folder, once the rows of tasks that ended are reconciled
    (as ``status`` reconciles training records): the label arrays still at work."""
    reconcile_labels(db, site)
    held: dict[str, tuple[set[str], list[int]]] = {}
    for row in db.iter_rows(status=StructureStatus.LABELLING):
        jobs, rows = held.setdefault(str(row.get("label_folder") or "(in-process labeller)"), (set(), []))
        if row.get("label_job") is not None:
            jobs.add(str(row.get("label_job")))
        rows.append(row.id)
    return [LabellingNow(folder, tuple(sorted(jobs)), len(rows)) for folder, (jobs, rows) in sorted(held.items())]


def submit_labels(site: SiteConfig, db: DatabaseManager, labeller: LabellerConfig, retry_failed: bool = False,
                  out_dir: Path | None = None, notify: Callable[[str], None] | None = None
                  ) -> LabelSubmission | None:
    """Submit one label array for every DFT_REQUESTED row (and, with ``retry_failed``, every
    LABEL_FAILED one); None when there is nothing to label."""
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    scheduler = scheduler_for(labeller_site(site, labeller))
    for warning in scheduler.check():
        say(f"warning: {warning}")
    reconcile_labels(db, site)
    retried = db.retry_failed_labels() if retry_failed else []
    if retried:
        say(f"{len(retried)} LABEL_FAILED structures back to DFT_REQUESTED to be labelled again")
    rows = list(db.iter_rows(status=StructureStatus.DFT_REQUESTED))
    if not rows:
        return None
    generation = max((int(r.get("selected_by_generation", 0) or 0) for r in rows), default=0)
    per = labeller.structures_per_task
    ids = [row.id for row in rows]
    tasks = [ids[k:k + per] for k in range(0, len(ids), per)]
    # Beside a SQLite database (the site's default is output/structures.db), else in the site's output.
    home = site.output_dir if is_url(db.target) else Path(db.target).resolve().parent
    folder = LabelFolder(fresh_dir(out_dir or default_label_dir(home, generation)))
    request = LabelRequest(database=absolute_target(db.target), generation=generation, labeller=labeller,
                           tasks=tasks, retried=retried, potentials=_potentials(db, rows, labeller))
    folder.save_request(request)
    jobs = scheduler.submit_array(LabelTask(), [(str(folder.path.resolve()), k) for k in range(len(tasks))],
                                  folder=folder, role=JobRole.LABEL,
                                  name=job_name(generation, JobRole.LABEL, folder.path),
                                  resources=site.resources(JobRole.LABEL), max_parallel=labeller.max_parallel)
    folder.save_jobs(jobs)
    say(f"label array submitted ({jobs[0].scheduler}): {len(tasks)} tasks for {len(ids)} structures, "
        f"first task {jobs[0].job_id}; folder {folder.path}")
    return LabelSubmission(folder, request, jobs)


def _potentials(db: DatabaseManager, rows: list, labeller: LabellerConfig) -> dict[int, str]:
    """With an ``energy_window``: the published folder of each generation that selected rows."""
    if labeller.energy_window is None:
        return {}
    found = {}
    for generation in {int(r.get("selected_by_generation")) for r in rows if r.get("selected_by_generation")}:
        record = db.get_record(generation)
        if record is not None and record.potential_path:
            found[generation] = str(Path(record.potential_path).resolve())
    return found


def summarize(db: DatabaseManager, folder: LabelFolder) -> LabelSummary:
    """The step as its rows tell it now (a task killed outright wrote no task file)."""
    request = folder.request()
    summary = LabelSummary(folder=str(folder.path), labeller=request.labeller.name,
                           requested=sum(len(t) for t in request.tasks), retried=list(request.retried),
                           tasks=len(request.tasks))
    for index, ids in enumerate(request.tasks):
        outcome = folder.outcome(index)
        if outcome is not None:
            summary.retried += [i for i in outcome.retried if i not in summary.retried]
        for row_id in ids:
            row = db.get_row(row_id)
            status = row.get("status")
            if status == StructureStatus.TRAINING_READY:
                summary.labelled.append(row_id)
            elif status == StructureStatus.LABEL_FAILED:
                summary.failed[row_id] = str(row.get("label_error", "unknown failure"))
            elif status == StructureStatus.DFT_REQUESTED:
                summary.returned.append(row_id)
    return summary


def wait_for_labels(site: SiteConfig, db: DatabaseManager, folder: str | Path, timeout_s: float,
                    poll_s: float = 1.0, notify: Callable[[str], None] | None = None) -> LabelSummary:
    """Follow the label array in ``folder`` until every task ended, reconcile the rows of
    tasks that died, and write and return its summary; SchedulerError (one line) if tasks
    are still going after ``timeout_s`` (they keep running)."""
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    labels = LabelFolder(folder)
    jobs = labels.jobs()
    scheduler = scheduler_for(site)
    deadline = time.monotonic() + timeout_s
    last: dict[JobState, int] = {}
    while True:
        states = scheduler.states(jobs)
        counts = {s: states.count(s) for s in set(states)}
        if counts != last:
            say("label tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            last = counts
        # A task's file is written once its rows are all committed: no need to wait for the
        # scheduler to see its process gone (the local watcher backs off to seconds).
        if all(s in FINISHED or labels.task_file(k).exists() for k, s in enumerate(states)):
            break
        if time.monotonic() > deadline:
            raise SchedulerError(f"label array {jobs[0].job_id.split('_')[0]} not finished after {timeout_s:.0f} s; "
                                 f"it keeps running: its folder is {labels.path}")
        time.sleep(poll_s)
    for k, (job, state) in enumerate(zip(jobs, states)):
        if state != JobState.COMPLETED and not labels.task_file(k).exists():
            say(f"label task {job.job_id} ended {state}: {job.last_error() or 'no error written'}")
    # sacct says CANCELLED as soon as an array is scancelled, while its tasks may still be
    # ending (a claim just before the signal, a release after it): reconcile until this
    # step's rows are settled, for a few seconds at most; any row still held then is
    # reconciled by the next label or loop.
    settle = time.monotonic() + SETTLE_S
    ids = [i for task in labels.request().tasks for i in task]
    while True:
        reconcile_labels(db, site)
        if time.monotonic() > settle or not any(_held_here(db.get_row(i), labels) for i in ids):
            break
        time.sleep(0.5)
    summary = summarize(db, labels)
    atomic_write_text(labels.summary_file, summary.model_dump_json(indent=2))
    return summary


def _held_here(row, labels: LabelFolder) -> bool:
    """Whether ``row`` is LABELLING by a task of this label folder (not of another run's)."""
    return row.get("status") == StructureStatus.LABELLING and \
        Path(str(row.get("label_folder", ""))).resolve() == labels.path.resolve()


def run_labels(site: SiteConfig, db: DatabaseManager, labeller: LabellerConfig, retry_failed: bool = False,
               timeout_s: float | None = None, notify: Callable[[str], None] | None = None) -> LabelSummary | None:
    """Submit the label array and wait for it; None when nothing was left to label."""
    sub = submit_labels(site, db, labeller, retry_failed=retry_failed, notify=notify)
    if sub is None:
        return None
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    return wait_for_labels(site, db, sub.folder.path, timeout, notify=notify)


# -- the loop's label step and its gate ---------------------------------------------------------
def label_step(site: SiteConfig, db: DatabaseManager, labeller: LabellerConfig, timeout_s: float,
               notify: Callable[[str], None] | None = None, poll_s: float = 2.0) -> LabelSummary | None:
    """The loop's label step: one array for the requested rows, then a wait (``timeout_s`` at
    most) for rows another label run still holds, so that training sees them labelled."""
    say = notify or (lambda message: None)
    deadline = time.monotonic() + timeout_s
    summary = run_labels(site, db, labeller, timeout_s=timeout_s, notify=say)
    if summary is not None:
        say(f"loop: labels of generation {summary_generation(db, summary)}: {summary.describe()}")
    while db.count(status=StructureStatus.LABELLING):
        if time.monotonic() > deadline:
            held = [row.id for row in db.iter_rows(status=StructureStatus.LABELLING)]
            raise LabellingError(f"structures {', '.join(f'id={i}' for i in held[:10])} are still being labelled "
                                 f"by another label run after {timeout_s:.0f} s")
        time.sleep(poll_s)
        reconcile_labels(db, site)
    return summary


def summary_generation(db: DatabaseManager, summary: LabelSummary) -> int:
    return LabelFolder(summary.folder).request().generation


def check_label_gate(db: DatabaseManager, generation: int, max_failed_fraction: float) -> tuple[int, int]:
    """The rows generation ``generation`` selected: (labelled, failed). LabellingError naming the
    failures when more than ``max_failed_fraction`` of them failed (DP-GEN's ratio_failed)."""
    labelled = db.count(status=StructureStatus.TRAINING_READY, selected_by_generation=int(generation))
    failed = {row.id: str(row.get("label_error", "")) for row in
              db.iter_rows(status=StructureStatus.LABEL_FAILED, selected_by_generation=int(generation))}
    done = labelled + len(failed)
    if done and len(failed) / done > max_failed_fraction:
        named = "; ".join(f"id={i}: {why[:120]}" for i, why in sorted(failed.items())[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise LabellingError(
            f"generation {generation}: {len(failed)} of {done} labels failed ({len(failed) / done:.0%}, over "
            f"max_failed_fraction {max_failed_fraction:g}): {named}{more}; fix the labeller and run "
            "`label --retry-failed`, or raise max_failed_fraction")
    return labelled, len(failed)
