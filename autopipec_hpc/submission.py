"""The login node's side: prepare a generation, submit it, follow it, cancel it.

The calls behind `prepare`, `submit`, `status` and `cancel`, and the Python API's
``train_generation``. Following and cancelling work from the run folder alone, so a
new process (or a later login) can re-attach to a generation submitted earlier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autopipec_hpc.config import Evaluator, SiteConfig, TrainConfig
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest, DatasetSettings
from autopipec_hpc.errors import InsufficientDataError, one_line
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.generation import Generation, reconcile_generation
from autopipec_hpc.jobs import EvaluateJob, TrainJob, ValidateJob
from autopipec_hpc.levels import chosen_level
from autopipec_hpc.pacemaker.files import count_parameters
from autopipec_hpc.preflight import check_parent_potential, run_preflight
from autopipec_hpc.run_folder import RunSpec, new_run_folder
from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.scheduler.base import Scheduler, SubmittedJobs, job_name
from autopipec_hpc.splits import check_holdout_found, content_key, holdout_file_keys
from autopipec_hpc.states import JobRole, RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import absolute_target, patiently
from autopipec_hpc.store.records import TrainingRecord
from autopipec_hpc.warm_start import check_warm_start

log = logging.getLogger(__name__)


# pyace has no analytic gradient: above this many parameters a fit is slow enough
# that the user should hear about it before anything is queued.
PYACE_PARAMETER_WARNING = 48


@dataclass(frozen=True)
class TrainingPlan:
    """What the training job will do: pacemaker's evaluator and the basis size."""

    evaluator: Evaluator
    parameters: int | None
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        size = f"{self.parameters} parameters" if self.parameters is not None else "parameters unknown (no pyace here)"
        return f"pacemaker evaluator {self.evaluator}, {size}"


@dataclass(frozen=True)
class Submission:
    spec: RunSpec
    manifest: DatasetManifest
    jobs: SubmittedJobs
    plan: TrainingPlan


def plan_training(config: TrainConfig, elements: list[str], evaluator: Evaluator) -> TrainingPlan:
    parameters = count_parameters(config, elements)
    warnings: list[str] = []
    if evaluator == Evaluator.PYACE and parameters is not None and parameters > PYACE_PARAMETER_WARNING:
        evaluations = (parameters + 1) * config.maxiter
        warnings.append(
            f"the pyace evaluator has no analytic gradient: each of the {config.maxiter} iterations costs "
            f"about {parameters + 1} loss evaluations ({parameters} parameters + 1), about {evaluations:,} "
            "in all; install pacemaker's TensorFlow evaluator (README: Installing) or shrink the basis"
        )
    return TrainingPlan(evaluator, parameters, tuple(warnings))


def dataset_settings(config: TrainConfig) -> DatasetSettings:
    """The dataset stage's settings from the training settings."""
    return DatasetSettings(
        test_fraction=config.test_fraction,
        seed=config.seed,
        zbl_inner=config.zbl_inner,
        zbl_outer=config.zbl_outer,
        reference_energies=config.reference_energies,
        holdout=config.holdout,
    )


def with_fixed_holdout(db: DatabaseManager, config: TrainConfig) -> TrainConfig:
    """``config`` with its holdout file's path made absolute, after checking (one streamed
    pass, before anything is claimed) that every holdout config type and every structure
    of the holdout file is among the labelled rows; ConfigError naming what is not."""
    holdout = config.holdout
    if holdout is None:
        return config
    if holdout.file is not None:
        holdout = holdout.model_copy(update={"file": holdout.file.expanduser().resolve()})
    keys = holdout_file_keys(holdout.file) if holdout.file is not None else {}
    config_types, matched = set(), set()
    for atoms in db.iter_structures(StructureStatus.TRAINING_READY):
        config_types.add(str(atoms.info["config_type"]))
        key = content_key(atoms) if keys else b""
        if key in keys:
            matched.add(key)
    check_holdout_found(holdout, keys, config_types, matched)
    return config.model_copy(update={"holdout": holdout})


def prepare_dataset_from_db(
    db: DatabaseManager, settings: DatasetSettings, out: Path, status: str = StructureStatus.TRAINING_READY,
    level_of_theory: str | None = None,
) -> DatasetManifest:
    """The delta datasets of the rows with ``status``, written into ``out``: of one level of
    theory (``levels.py``: mixed levels refused unless ``level_of_theory`` picks one)."""
    if db.count(status=status) == 0:
        raise InsufficientDataError(f"no structures with status={status} in {db.target}; nothing written")
    level = chosen_level(db, status, level_of_theory)
    return DatasetBuilder(settings).prepare_dataset(db.ready_structures(status, level), out)


def prepare_run(
    database: str,
    site: SiteConfig,
    config: TrainConfig,
    generation: int | None = None,
    force: bool = False,
) -> tuple[RunSpec, DatasetManifest]:
    """Claim a generation (and its run folder) in the database, then write its datasets.

    The claim comes first and is atomic, so two submits never train one generation;
    a failure after it leaves the record FAILED with the reason."""
    db = DatabaseManager(database, must_exist=True)  # nothing to train in one it would make
    if db.count(status=StructureStatus.TRAINING_READY) == 0:
        raise InsufficientDataError(
            f"no structures with status={StructureStatus.TRAINING_READY} in {db.target}; nothing written"
        )
    config = with_fixed_holdout(db, config)  # a holdout named wrong is refused before the claim
    chosen_level(db, StructureStatus.TRAINING_READY, config.level_of_theory)  # mixed levels, too
    if generation is not None:
        reconcile_generation(db, generation)  # a stale record must not block the claim
    work = Path(site.work_dir).resolve()
    generation, run_dir = db.claim(
        generation, lambda number: new_run_folder(work, number).path, force=force,
        data={"config": config.model_dump(mode="json"), "site": site.name},
    )
    spec = RunSpec(
        generation=generation,
        run_dir=str(run_dir),
        database=absolute_target(database),
        output_dir=str(Path(site.output_dir).resolve()),
        site=site,
        config=config,
        force=force,
    )
    try:
        spec.save()
        manifest = prepare_dataset_from_db(db, dataset_settings(config), spec.dataset_dir,
                                           level_of_theory=config.level_of_theory)
    except BaseException as exc:
        db.update_record(generation, run_dir, RecordState.FAILED, reason=f"not submitted: {one_line(exc)}")
        raise
    db.update_record(
        generation, run_dir, RecordState.SUBMITTED,
        values={"n_train": len(manifest.train_ids), "n_test": len(manifest.test_ids)},
        data={"reference_energies": manifest.reference_energies},
    )
    return spec, manifest



def submit_generation(
    database: str,
    site: SiteConfig,
    config: TrainConfig,
    generation: int | None = None,
    force: bool = False,
    notify: Callable[[str], None] | None = None,
) -> Submission:
    """Prepare the datasets here, then submit training and its dependent evaluation.

    ``notify`` hears the training plan and its warnings before anything is queued."""
    say = notify or log.warning
    parent, parent_potential = None, ""
    if config.warm_start is not None:
        # refused by name before anything is written: the settings, then the parent's file
        config, parent = check_warm_start(database, config)
        parent_potential = check_parent_potential(parent)
    spec, manifest = prepare_run(database, site, config, generation, force)
    scheduler = scheduler_for(site)
    try:
        if parent is not None:
            atomic_write_text(spec.folder.warm_start_potential, parent_potential)
            say(f"warm start from generation {parent.generation} ({parent.folder})")
        evaluator = run_preflight(spec, manifest, scheduler, warn=say)
        plan = plan_training(config, manifest.elements, evaluator)
        say(plan.describe())
        for warning in plan.warnings:
            say(f"warning: {warning}")
        spec = spec.model_copy(update={"evaluator": str(evaluator)})
        spec.save()
        jobs = submit_jobs(scheduler, spec, site)
    except BaseException as exc:
        DatabaseManager(spec.database, must_exist=True).update_record(
            spec.generation, spec.run_dir, RecordState.FAILED, reason=f"not submitted: {one_line(exc)}"
        )
        raise
    # The jobs run already: the training job may have written RUNNING (or more) by now,
    # so the job ids are added without a state, and a busy database is waited out
    # (bounded) instead of failing a submission whose jobs are queued.
    db = DatabaseManager(spec.database, must_exist=True)
    job_values = {"scheduler": jobs.scheduler, "train_job": jobs.train.job_id, "evaluate_job": jobs.evaluate.job_id,
                  "evaluator": str(plan.evaluator), "parameters": plan.parameters}
    if jobs.validate_job is not None:
        job_values["validate_job"] = jobs.validate_job.job_id
    patiently(lambda: db.add_values(spec.generation, spec.run_dir, job_values),
              f"generation {spec.generation}: recording its job ids")
    return Submission(spec, manifest, jobs, plan)


def submit_jobs(scheduler: Scheduler, spec: RunSpec, site: SiteConfig) -> SubmittedJobs:
    """Hand the job bodies to the scheduler: training, then its evaluation only after
    training succeeded, then (where the config validates) its validation only after the
    evaluation succeeded; saved in the run folder (``jobs.json``) for any later process."""
    folder = spec.folder
    train = scheduler.submit(TrainJob(), spec.run_dir, folder=folder, role=JobRole.TRAIN,
                             name=job_name(spec.generation, JobRole.TRAIN, folder.path), resources=site.train)
    evaluate = scheduler.submit(EvaluateJob(), spec.run_dir, folder=folder, role=JobRole.EVALUATE,
                                name=job_name(spec.generation, JobRole.EVALUATE, folder.path),
                                resources=site.evaluate, after=train)
    validate = None
    if spec.config.validation.enabled:
        validate = scheduler.submit(ValidateJob(), spec.run_dir, folder=folder, role=JobRole.VALIDATE,
                                    name=job_name(spec.generation, JobRole.VALIDATE, folder.path),
                                    resources=site.resources(JobRole.VALIDATE), after=evaluate)
    jobs = SubmittedJobs(train=train, evaluate=evaluate, validate_job=validate)
    jobs.save(folder.path)
    return jobs


def train_generation(
    site: SiteConfig,
    config: TrainConfig,
    database: str | None = None,
    generation: int | None = None,
    force: bool = False,
    timeout_s: float | None = None,
) -> TrainingRecord:
    """Prepare, train, evaluate and publish one generation through the site's scheduler
    and return its SUCCEEDED training record (the Python API's one call).

    Raises InsufficientDataError, TrainingFailedError or TrainingDivergenceError.
    """
    submission = submit_generation(database or site.database, site, config, generation, force)
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    return Generation.open(submission.spec.path).wait(timeout)


