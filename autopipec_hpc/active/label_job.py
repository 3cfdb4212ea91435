"""A label array task's body, on the compute node: label the rows the login side gave it.

Each row is claimed under the records' lock before it is computed (LABELLING, with this
task's job id and folder), so two ``label`` runs at once compute every row once; each is
written as soon as it is done (TRAINING_READY with its provenance) or tagged LABEL_FAILED
with its one-line reason, so a task that dies loses only the row it was computing, which
the login side puts back to DFT_REQUESTED once the scheduler says the task ended. A task
told to stop (scancel, its time limit) puts its current row back and claims no more.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from autopipec_hpc.active.label_checks import (
    LabelTimeout,
    Predictions,
    check_suspicious,
    compute_label,
    reason_of,
)
from autopipec_hpc.active.label_folder import LabelFolder, TaskOutcome
from autopipec_hpc.active.labeller_config import LabellerConfig
from autopipec_hpc.errors import JobStopped
from autopipec_hpc.processes import commit_point, die_with_local_controller, stop_requested
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import patiently

log = logging.getLogger(__name__)


def task_job_id() -> str:
    """This task's job id as the scheduler lists it (SLURM ``ARRAY_TASK``; locally submitit's)."""
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not in a submitit job (a test calling label_rows)
        return str(os.getpid())


class LabelTask:
    """The body of one array task: ``LabelTask()(folder, index)``. Picklable."""

    def __call__(self, folder: str, index: int) -> dict:
        die_with_local_controller()
        labels = LabelFolder(folder)
        request = labels.request()
        db = DatabaseManager(request.database, must_exist=True)
        outcome = label_rows(db, request.labeller, request.tasks[index], folder=str(labels.path),
                             job_id=task_job_id(), predictions=Predictions(request.potentials))
        labels.save_outcome(index, outcome)
        return outcome.model_dump(mode="json")


def label_rows(db: DatabaseManager, labeller: LabellerConfig, row_ids: list[int], folder: str = "",
               job_id: str = "", predictions: Predictions | None = None) -> TaskOutcome:
    """Claim, compute and store each of ``row_ids`` in turn (see the module's docstring)."""
    start = time.monotonic()
    outcome = TaskOutcome()
    me = f"{socket.gethostname()}:{os.getpid()}"
    provenance = labeller.provenance()
    for row_id in row_ids:
        if stop_requested():
            break  # claim nothing more: the rest stay DFT_REQUESTED for the next run

        def claim(row_id: int = row_id) -> bool:
            with db.locked():
                return db.claim_label(row_id, me, label_job=job_id, label_folder=folder)

        if not patiently(claim, f"structure id={row_id}: claim"):
            outcome.skipped.append(row_id)
            continue
        try:
            _label_one(db, labeller, row_id, provenance, outcome, predictions)
        except BaseException as exc:
            # Stopped, or a failure of our own (the database): the row goes back, unlabelled.
            db.release_label(row_id, error=None if isinstance(exc, JobStopped) else reason_of(exc))
            raise
    outcome.seconds = time.monotonic() - start
    return outcome


def _label_one(db: DatabaseManager, labeller: LabellerConfig, row_id: int, provenance: dict,
               outcome: TaskOutcome, predictions: Predictions | None) -> None:
    row = db.get_row(row_id)
    atoms = row.toatoms()
    atoms.calc = None
    atoms.info["label_row_id"] = row_id  # lets a fault-injecting calculator pick its rows
    limit = labeller.time_limit_s
    label, reason = None, None
    for attempt in range(labeller.retries + 1):
        try:
            result = compute_label(atoms, labeller, limit)
            check_suspicious(atoms, result.energy, row, labeller, predictions)
            label = result  # only a result that passed every check
            break
        except JobStopped:
            raise
        except LabelTimeout as exc:
            reason = reason_of(exc)
            if attempt == labeller.retries:
                break
            # A timeout may be a slow SCF, not a broken one: once more with twice the time (pyiron's way).
            outcome.retried.append(row_id)
            limit *= 2
            log.warning("structure id=%s: %s; trying again with %g s", row_id, reason, limit)
        except Exception as exc:  # the calculator's own failure (SCF, I/O) or a check: tagged, not fatal
            reason = reason_of(exc)
            break
    if label is None:
        reason = reason or "no result"
        with commit_point(f"structure id={row_id}: LABEL_FAILED"):
            db.fail_label(row_id, reason, **provenance)
        outcome.failed[row_id] = reason
        return
    with commit_point(f"structure id={row_id}: its labels"):
        db.set_labels(row_id, label.energy, label.forces, StructureStatus.TRAINING_READY, stress=label.stress,
                      **provenance)
    outcome.labelled.append(row_id)
    outcome.atoms += len(atoms)
