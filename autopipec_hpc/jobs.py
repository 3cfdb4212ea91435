"""The pipeline's job bodies, which any scheduler can run: training, then evaluation and publication
(or, where the config validates, evaluation, then validation and publication).

``TrainJob``, ``EvaluateJob`` and ``ValidateJob`` run wherever the scheduler puts them and need
only the run folder (``run_folder.py``) that ``submission.prepare_run`` made on
the login node.
"""

from __future__ import annotations

from autopipec_hpc.pacemaker.environment import check_backend, job_threads
from autopipec_hpc.store.database import JOB_DB_PATIENCE_S, patiently

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit
from pydantic import BaseModel

from autopipec_hpc import evaluation, registry
from autopipec_hpc.dataset_prep import MANIFEST as DATASET_MANIFEST
from autopipec_hpc.dataset_prep import DatasetManifest
from autopipec_hpc.states import JobRole, RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import (
    AutopipecError,
    JobStopped,
    PublicationError,
    TrainingDivergenceError,
    TrainingFailedError,
    TrainingInterrupted,
)
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.processes import commit_point, die_with_local_controller, stop_on_signals
from autopipec_hpc.pacemaker.files import FITTING_DATA_INFO, PACEMAKER_INPUT, TEST_PREDICTIONS, TrainingResult, iterations_done, learning_curve
from autopipec_hpc.pacemaker.resume import remaining_iterations, resume_point, stalled
from autopipec_hpc.pacemaker.run import PacemakerWrapper, check_divergence
from autopipec_hpc.run_folder import RunFolder, RunSpec, attempt_number

log = logging.getLogger(__name__)


def update_record(spec: RunSpec, status: RecordState, reason: str = "", values: dict[str, Any] | None = None,
                  data: dict[str, Any] | None = None, patience_s: float = JOB_DB_PATIENCE_S,
                  db: DatabaseManager | None = None) -> bool:
    """A job's write of its generation's record: only as the run that holds the claim,
    only forward, retried while the database is busy (bounded). Pass the ``db`` whose
    records lock is held, if one is (the lock is re-entrant per manager only)."""
    db = db or DatabaseManager(spec.database, must_exist=True)
    return patiently(
        lambda: db.update_record(spec.generation, spec.run_dir, status, reason=reason, values=values, data=data),
        f"generation {spec.generation}: writing {status}", patience_s,
    )


class TrainVerdict(BaseModel):
    """The training job's verdict (``train.done``), for the evaluation job."""

    ok: bool
    status: RecordState | None = None  # the record's final state where training failed
    reason: str = ""
    attempt: str | None = None  # the attempt folder whose potential is evaluated

    def save(self, folder: RunFolder) -> None:
        atomic_write_text(folder.train_verdict, self.model_dump_json(exclude_none=True))


def record_failure(spec: RunSpec, status: RecordState, reason: str, log_tail: str = "") -> None:
    """Record a final failure (CANCELLED where a cancel was asked) and the training verdict."""
    if spec.folder.cancel_marker.exists():
        status, reason = RecordState.CANCELLED, "cancelled by user"
    TrainVerdict(ok=False, status=status, reason=reason).save(spec.folder)
    update_record(spec, status, reason=reason, data={"log_tail": log_tail} if log_tail else None)


def _reclaim_for_rerun(spec: RunSpec) -> bool:
    """A kept job script resubmitted by hand after its run failed: the run folder
    claims its generation again (a new record, as any new claim), unless another
    run holds it, it succeeded, or it was cancelled."""
    db = DatabaseManager(spec.database, must_exist=True)
    record = patiently(lambda: db.get_record(spec.generation), f"generation {spec.generation}: reading its record")
    if record is None or str(record.run_dir) != spec.run_dir:
        return False
    if record.status not in (RecordState.FAILED, RecordState.DIVERGED) or spec.folder.cancel_marker.exists():
        return False
    log.warning("generation %s: %s ran again after it %s; claiming the generation anew",
                spec.generation, spec.run_dir, record.status)
    spec.folder.train_verdict.unlink(missing_ok=True)
    patiently(lambda: db.claim(spec.generation, lambda _: spec.path, data={"config": spec.config.model_dump(mode="json")}),
              f"generation {spec.generation}: claiming it again")
    return True


class TrainJob(submitit.helpers.Checkpointable):
    """Train one generation. Requeued on time limit or preemption; a requeued run
    resumes from the last attempt's interim potential, up to ``max_restarts`` times."""

    def __call__(self, run_dir: str) -> dict[str, Any]:
        die_with_local_controller()
        # A stop before or after pacemaker is a TrainingInterrupted as one during it is.
        stop_on_signals()
        spec = RunSpec.load(run_dir)
        config = spec.config
        site = spec.site
        folder = spec.folder
        folder.requeue_marker.unlink(missing_ok=True)
        previous = folder.attempts()
        resume_from = resume_point(previous)
        attempt = folder.next_attempt
        warm_start = _warm_start(folder)
        if warm_start is not None:
            config = config.model_copy(update={"maxiter": config.warm_start_budget})
        if resume_from is not None:
            config = config.model_copy(update={"maxiter": remaining_iterations(config.maxiter, previous)})
        evaluator = spec.evaluator or str(site.pacemaker.evaluator)
        threads = job_threads(site)
        try:
            environment = check_backend(site, evaluator, threads)
        except TrainingInterrupted:
            raise  # a signal: only the scheduler knows a cancel from a requeue
        except TrainingFailedError as exc:
            record_failure(spec, RecordState.FAILED, str(exc))
            raise
        running = {"attempt": attempt_number(attempt), "resumed_from": str(resume_from or ""), **environment}
        if not update_record(spec, RecordState.RUNNING, reason="", values=running):
            if not _reclaim_for_rerun(spec) or not update_record(spec, RecordState.RUNNING, values=running):
                raise TrainingFailedError(
                    f"generation {spec.generation} is no longer this run's to train (cancelled, or claimed by another run)"
                )
        manifest = DatasetManifest.load(spec.dataset_dir)
        cancelled = folder.cancel_marker.exists
        wrapper = PacemakerWrapper(
            command=site.pacemaker.command, evaluator=evaluator, should_stop=cancelled, threads=threads
        )
        try:
            if cancelled():
                raise TrainingInterrupted("training not started: cancel requested")
            result = wrapper.run_training(
                manifest.train_paths,
                manifest.test_paths,
                config,
                run_dir=attempt,
                elements=manifest.elements,
                initial_potential=resume_from or warm_start,
                generation=spec.generation,
            )
        except TrainingDivergenceError as exc:
            record_failure(spec, RecordState.DIVERGED, str(exc))
            raise
        except TrainingInterrupted:
            if folder.cancel_marker.exists():
                record_failure(spec, RecordState.CANCELLED, "cancelled by user")
            # Otherwise a signal from the scheduler: a requeue (time limit, preemption,
            # `scontrol requeue`, a node lost) or an scancel. Which one only the scheduler
            # knows, so nothing is written here: the record stays as it is until the
            # requeued attempt runs, or the login side reconciles it with the scheduler.
            raise
        except TrainingFailedError as exc:
            record_failure(spec, RecordState.FAILED, str(exc), exc.log_tail)
            raise
        TrainVerdict(ok=True, attempt=str(result.run_dir)).save(folder)
        return asdict(result)

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission | None:
        spec = RunSpec.load(run_dir)
        attempts = spec.folder.attempts()
        restarts = max(0, len(attempts) - 1)
        if restarts >= spec.site.max_restarts:
            record_failure(spec, RecordState.FAILED, f"time limit reached after {restarts} restarts (max_restarts)")
            return None
        if attempts and (stall := stalled(attempts[-1], spec.site.train.time_minutes,
                                          spec.evaluator or str(spec.site.pacemaker.evaluator))):
            record_failure(spec, RecordState.FAILED, stall)
            return None
        spec.folder.requeue_marker.touch()
        update_record(
            spec, RecordState.SUBMITTED,
            reason=f"requeued after a time limit or preemption (restart {restarts + 1})",
            values={"restarts": restarts + 1},
        )
        return submitit.helpers.DelayedSubmission(self, run_dir)


def _warm_start(folder: RunFolder) -> Path | None:
    """The parent's potential a warm-started generation begins from (first attempt only)."""
    return folder.warm_start_potential if folder.warm_start_potential.exists() else None


def generation_learning_curve(run_dir: Path):
    """The learning curves of all attempts, one after the other: a resumed attempt
    counts its iterations on from where the previous one stopped."""
    import pandas as pd

    parts, offset = [], 0
    for attempt in RunFolder(run_dir).attempts():
        curve = learning_curve(attempt)
        if curve is None:
            continue
        curve = curve.assign(iteration=curve["iteration"] + offset, attempt=attempt_number(attempt))
        parts.append(curve)
        offset = int(curve["iteration"].max())
    return pd.concat(parts, ignore_index=True) if parts else None


def _as_dict(value: Any) -> dict[str, Any] | None:
    return None if value is None else asdict(value)


def training_verdict(run_dir: Path) -> TrainVerdict | None:
    path = RunFolder(run_dir).train_verdict
    return TrainVerdict.model_validate_json(path.read_text()) if path.exists() else None


class EvaluateJob:
    """Evaluate the trained potential on the holdout set; publish it only if it holds."""

    def __call__(self, run_dir: str) -> dict[str, Any]:
        die_with_local_controller()
        spec = RunSpec.load(run_dir)
        marker = spec.folder.stop_marker(JobRole.EVALUATE)
        marker.unlink(missing_ok=True)  # a requeued or resubmitted evaluation starts unstopped
        # Told to stop, it publishes nothing and writes no record: the marker tells the
        # reconciliation that this evaluation was cancelled while it ran (CANCELLED).
        stop_on_signals(on_stop=marker.write_text)
        verdict = training_verdict(spec.path)
        if verdict is None or not verdict.ok or verdict.attempt is None:
            reason = verdict.reason if verdict is not None and verdict.reason else "training did not finish"
            raise TrainingFailedError(f"nothing to evaluate for generation {spec.generation}: {reason}")
        return evaluate_and_publish(spec, Path(verdict.attempt))


def evaluate_and_publish(spec: RunSpec, attempt: Path) -> dict[str, Any]:
    from pyace import PyACECalculator

    config = spec.config
    site = spec.site
    db = DatabaseManager(spec.database, must_exist=True)
    patiently(lambda: _still_ours(db, spec), f"generation {spec.generation}: reading its record")
    manifest = DatasetManifest.load(spec.dataset_dir)
    result = TrainingResult.load(attempt)
    staging = registry.new_staging_dir(spec.output_dir, spec.generation)
    try:
        registry.stage_potential(
            staging,
            Path(result.potential),
            attempt / FITTING_DATA_INFO,
            manifest.elements,
            manifest.zbl_inner,
            manifest.zbl_outer,
            manifest.reference_energies,
            spec.generation,
            site.pacemaker.command,
            parent_generation=config.warm_start,
        )
        report, total = evaluation.evaluate(
            manifest.test_paths,
            PyACECalculator(str(staging / registry.POTENTIAL_YAML)),
            registry.load_calculator(staging),
        )
        check_divergence(config, report.total.energy_rmse_mev, report.total.force_rmse_mev, "holdout")
        if not manifest.test_ids:
            log.warning("generation %s has no holdout structures; metrics are empty", spec.generation)
        training = {
            "iterations": result.iterations,
            "energy_rmse_mev": result.train_rmse_energy_mev,
            "force_rmse_mev": result.train_rmse_force_mev,
        }
        extra = {
            "generation": spec.generation,
            "training": training,
            "wall_time_s": result.wall_time_s,
            "attempt": str(attempt),
            "pacemaker_test_rmse": {
                "energy_mev": result.test_rmse_energy_mev,
                "force_mev": result.test_rmse_force_mev,
            },
            "pacemaker_test_pred": _as_dict(evaluation.pacemaker_prediction_stats(attempt / TEST_PREDICTIONS)),
        }
        evaluation_dir = spec.folder.evaluation_dir
        evaluation_dir.mkdir(exist_ok=True)
        report.save(staging / registry.METRICS, extra)
        evaluation.parity_plot(total, staging / registry.PARITY_PLOT, f"generation {spec.generation}: holdout, ACE + ZBL")
        evaluation.learning_curve_plot(
            generation_learning_curve(spec.path), staging / registry.LEARNING_CURVE_PLOT,
            f"generation {spec.generation}: learning curve",
        )
        shutil.copy2(attempt / PACEMAKER_INPUT, staging / registry.TRAINING_INPUT)
        shutil.copy2(spec.dataset_dir / DATASET_MANIFEST, staging / DATASET_MANIFEST)
        for name in registry.EVALUATION_FILES:
            shutil.copy2(staging / name, evaluation_dir / name)
    except TrainingDivergenceError as exc:
        registry.discard(staging)
        record_failure(spec, RecordState.DIVERGED, str(exc))
        raise
    except TrainingInterrupted:
        registry.discard(staging)  # told to stop: the scheduler's CANCELLED tells the rest
        raise
    except (PublicationError, AutopipecError) as exc:
        registry.discard(staging)
        update_record(spec, RecordState.FAILED, reason=f"evaluation/publication failed: {exc}")
        raise
    except BaseException:
        registry.discard(staging)
        raise
    values = {
        "iterations": sum(iterations_done(a) for a in spec.folder.attempts()),  # across requeues
        "wall_time_s": result.wall_time_s,
        "train_energy_rmse_mev": result.train_rmse_energy_mev,
        "train_force_rmse_mev": result.train_rmse_force_mev,
        "test_energy_rmse_mev": report.total.energy_rmse_mev,
        "test_energy_mae_mev": report.total.energy_mae_mev,
        "test_force_rmse_mev": report.total.force_rmse_mev,
        "residual_energy_rmse_mev": report.residual.energy_rmse_mev,
        "residual_force_rmse_mev": report.residual.force_rmse_mev,
    }
    if config.warm_start is not None:
        values["parent_generation"] = config.warm_start
    if config.validation.enabled:
        stage_for_validation(db, spec, staging, values)
        return values
    values["potential_path"] = str(registry.potentials_root(spec.output_dir) / str(spec.generation))
    publish_and_record(db, spec, staging, values, manifest)
    return values


def stage_for_validation(db: DatabaseManager, spec: RunSpec, staging: Path, values: dict[str, Any]) -> Path:
    """The evaluated potential, kept for the validation job (which publishes it or not), and
    the holdout figures on the still RUNNING record. Under the records' lock, as a
    publication: a generation cancelled meanwhile keeps nothing."""
    waiting = registry.validating_dir(spec.output_dir, spec.generation, spec.path)
    metrics = json.loads((staging / registry.METRICS).read_text())
    with db.locked(timeout_s=JOB_DB_PATIENCE_S):
        try:
            with commit_point(f"staging generation {spec.generation} for validation"):
                patiently(lambda: _still_ours(db, spec), f"generation {spec.generation}: reading its record")
                registry.discard(waiting)  # a resubmitted evaluation's leftover
                staging.rename(waiting)
                update_record(spec, RecordState.RUNNING, reason="evaluated; validating", values=values,
                              data={"metrics": metrics}, db=db)
        except BaseException:
            registry.discard(staging)
            registry.discard(waiting)
            raise
    return waiting


class ValidateJob:
    """Validate the evaluated potential (validate/): publish it if it passes the gate, else
    record REJECTED with the failed properties and publish nothing."""

    def __call__(self, run_dir: str) -> dict[str, Any]:
        die_with_local_controller()
        spec = RunSpec.load(run_dir)
        marker = spec.folder.stop_marker(JobRole.VALIDATE)
        marker.unlink(missing_ok=True)
        # Told to stop, it publishes and records nothing; the reconciliation reads the marker.
        stop_on_signals(on_stop=marker.write_text)
        waiting = registry.validating_dir(spec.output_dir, spec.generation, spec.path)
        if not waiting.exists():
            raise TrainingFailedError(f"nothing to validate for generation {spec.generation}: no {waiting}")
        return validate_and_publish(spec, waiting)


def validate_and_publish(spec: RunSpec, waiting: Path) -> dict[str, Any]:
    from autopipec_hpc.validate.report import PLOT, REPORT
    from autopipec_hpc.validate.run import validate_potential

    db = DatabaseManager(spec.database, must_exist=True)
    patiently(lambda: _still_ours(db, spec), f"generation {spec.generation}: reading its record")
    manifest = DatasetManifest.load(spec.dataset_dir)
    try:
        report = validate_potential(waiting, [*manifest.train_paths, *manifest.test_paths], manifest.elements,
                                    spec.config.cutoff, spec.config.validation, spec.generation,
                                    Path(spec.output_dir))
        spec.folder.validation_dir.mkdir(exist_ok=True)
        for name in (REPORT, PLOT):
            shutil.copy2(waiting / name, spec.folder.validation_dir / name)
    except TrainingInterrupted:
        registry.discard(waiting)  # told to stop (a cancel): nothing of it is published, now or later
        raise
    except AutopipecError as exc:
        registry.discard(waiting)
        update_record(spec, RecordState.FAILED, reason=f"validation failed to run: {exc}")
        raise
    values: dict[str, Any] = report.headline()
    log.warning("generation %s: %s (%.0f s)", spec.generation, report.one_line(), report.wall_time_s)
    if not report.passed:
        registry.discard(waiting)
        with db.locked(timeout_s=JOB_DB_PATIENCE_S), commit_point(f"rejecting generation {spec.generation}"):
            update_record(spec, RecordState.REJECTED, reason=report.one_line(), values=values, db=db)
        return values
    values["potential_path"] = str(registry.potentials_root(spec.output_dir) / str(spec.generation))
    publish_and_record(db, spec, waiting, values, manifest)
    return values


def _still_ours(db: DatabaseManager, spec: RunSpec) -> None:
    record = db.get_record(spec.generation)
    if record is None or str(record.run_dir) != spec.run_dir or not record.status.is_active:
        state = "missing" if record is None else f"{record.status} (run folder {record.run_dir})"
        raise TrainingFailedError(f"generation {spec.generation} is {state}; this run does not publish it")


def publish_and_record(db: DatabaseManager, spec: RunSpec, staging: Path, values: dict[str, Any],
                       manifest: DatasetManifest) -> Path:
    """Publish and mark SUCCEEDED as one step under the records' lock, so that the
    published folder and the record never disagree: a generation cancelled (or claimed
    by another run) meanwhile is not published, and a record that cannot be written
    takes the publication back."""
    metrics = json.loads((staging / registry.METRICS).read_text())
    with db.locked(timeout_s=JOB_DB_PATIENCE_S):
        # Checked under the lock, so a stop received while it waited refuses too; one
        # received from here on does not come between the publication and its record.
        try:
            with commit_point(f"publishing generation {spec.generation}"):
                final = _publish_as_ours(db, spec, staging, values, metrics)
        except JobStopped:
            registry.discard(staging)
            raise
    patiently(lambda: db.mark_used(spec.generation, manifest.train_ids, manifest.test_ids),
              f"generation {spec.generation}: marking the structures it used")
    return final


def _publish_as_ours(db: DatabaseManager, spec: RunSpec, staging: Path, values: dict[str, Any],
                     metrics: dict[str, Any]) -> Path:
    """``publish_and_record``'s step under the lock: publish only while the generation is
    this run's, and take the publication back where SUCCEEDED cannot be written."""
    try:
        patiently(lambda: _still_ours(db, spec), f"generation {spec.generation}: reading its record")
    except TrainingFailedError:
        registry.discard(staging)
        raise
    final = registry.publish(staging, spec.output_dir, spec.generation, force=spec.force)
    try:
        written = update_record(spec, RecordState.SUCCEEDED, reason="", values=values,
                                data={"metrics": metrics}, db=db)
    except BaseException:
        registry.discard(final)
        raise
    if not written:
        registry.discard(final)
        raise TrainingFailedError(f"generation {spec.generation}: the record refused SUCCEEDED; not published")
    return final
