"""The `autopipec-hpc` command: parse, call one library function, print with rich."""

from __future__ import annotations

from autopipec_hpc.cli.show import ProgressPrinter, _coloured, _say, console, print_common_holdout, print_dataset_summary, print_records, print_selection
from autopipec_hpc.templates import site_template

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.table import Table

from autopipec_hpc.config import SiteConfig, TrainConfig, describe_validation_error
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import redact
from autopipec_hpc.store.records import TrainingRecord
from autopipec_hpc.errors import AutopipecError, ConfigError, DatasetError
from autopipec_hpc.run_folder import GENERATION_PLACEHOLDER
from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.generation import cancel_generation, describe_jobs, reconcile_generation, generation_progress, wait_for_generation
from autopipec_hpc.submission import dataset_settings, plan_training, prepare_dataset_from_db, submit_generation


# -- commands -----------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    db = DatabaseManager(args.db)
    n = db.import_files(args.files, status=args.status, config_type=args.config_type)
    console.print(f"imported {n} structures into {args.db} with status={args.status}")
    return 0


def cmd_example_data(args: argparse.Namespace) -> int:
    from autopipec_hpc.example_data import write_example_database

    db = DatabaseManager(args.db)
    n = write_example_database(db)
    console.print(f"wrote {n} example copper structures (EMT labels) into {args.db}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    config = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in {"seed": args.seed, "test_fraction": args.test_fraction}.items() if v is not None}
    if overrides:
        config = _with_overrides(config, overrides)
    db = DatabaseManager(args.db, must_exist=True)
    try:
        manifest = prepare_dataset_from_db(db, dataset_settings(config), args.out, args.status)
    except OSError as exc:
        # A full disk or a folder that cannot be written: the files already there stay whole.
        raise DatasetError(f"{args.out}: cannot write the dataset ({exc.strerror or exc})") from None
    print_dataset_summary(manifest)
    return 0


def _with_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """``config`` with command-line values, validated like the YAML ones."""
    try:
        return TrainConfig.model_validate({**config.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(f"command line: {describe_validation_error(exc)}") from None


def _site_and_db(args: argparse.Namespace) -> tuple[SiteConfig, str]:
    site = SiteConfig.from_yaml(args.site)
    return site, args.db or site.database


def cmd_submit(args: argparse.Namespace) -> int:
    site, database = _site_and_db(args)
    config = TrainConfig.from_yaml(args.config)
    if args.from_generation is not None:
        config = config.model_copy(update={"warm_start": args.from_generation})
    sub = submit_generation(database, site, config, args.generation, args.force, notify=_say)
    print_dataset_summary(sub.manifest)
    console.print(
        f"generation {sub.spec.generation} submitted ({sub.jobs.scheduler}): training job {sub.jobs.train}, "
        f"evaluation job {sub.jobs.evaluate} (after training succeeds); run folder {sub.spec.run_dir}"
    )
    if not args.wait:
        return 0
    record = wait_for_generation(Path(sub.spec.run_dir), site.result_timeout_s, on_progress=ProgressPrinter())
    print_records([record], detail=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    site, database = _site_and_db(args)
    db = DatabaseManager(database, must_exist=True)
    records = _reconciled(db, args.generation)
    table = Table(title=f"training generations in {redact(database)}")
    for col in ("generation", "status", "jobs (train / evaluate)", "reason", "run folder"):
        table.add_column(col)
    for r in records:
        jobs = describe_jobs(r.run_dir) if r.run_dir is not None else ""
        table.add_row(str(r.generation), _coloured(r.status), jobs, r.reason[:80], str(r.run_dir or ""))
    console.print(table)
    for r in records:
        if r.status.is_active and r.run_dir is not None:
            current = generation_progress(r.run_dir)
            line = current.describe() if current else f"generation {r.generation}: no iteration reported yet"
            console.print(line, highlight=False, markup=False)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    site, database = _site_and_db(args)
    records = _reconciled(DatabaseManager(database, must_exist=True), args.generation)
    if args.generation is not None:
        if not records:
            raise AutopipecError(f"no training record for generation {args.generation} in {database}")
    print_records(records, detail=args.generation is not None)
    if args.common_holdout:
        print_common_holdout(DatabaseManager(database))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    site, database = _site_and_db(args)
    db = DatabaseManager(database, must_exist=True)
    record = reconcile_generation(db, args.generation)
    if record is None:
        raise AutopipecError(f"no training record for generation {args.generation} in {redact(database)}")
    if record.status.is_final or record.run_dir is None:
        console.print(f"generation {args.generation} is {record.status} already: nothing to cancel")
        return 0
    cancel_generation(record.run_dir)
    after = db.get_record(args.generation)
    state = after.status if after else "missing"
    console.print(f"generation {args.generation}: jobs cancelled, record {state} ({record.run_dir})")
    return 0


def _reconciled(db: DatabaseManager, generation: int | None) -> list[TrainingRecord]:
    """The records (of one generation, or all), each first brought in line with its jobs."""
    records = db.records() if generation is None else [r for r in [db.get_record(generation)] if r]
    return [reconcile_generation(db, r.generation) or r if r.status.is_active else r for r in records]


def cmd_check_site(args: argparse.Namespace) -> int:
    site = SiteConfig.from_yaml(args.file)
    table = Table(title=f"site {site.name}: {site.scheduler}")
    for col in ("job", "partition", "account", "qos", "GPUs", "CPUs", "memory", "time limit"):
        table.add_column(col)
    for role, res in site.job_resources().items():
        table.add_row(role, res.partition or "-", res.account or "-", res.qos or "-", str(res.gpus),
                      str(res.cpus), f"{res.mem_gb:g} GB", f"{res.time_minutes} min")
    console.print(table)
    console.print(f"work folder {site.work_dir}, published potentials in {site.output_dir}/potentials, "
                  f"database {site.database}")
    console.print(f"pacemaker: {site.pacemaker.command} (evaluator {site.pacemaker.evaluator}); "
                  f"job python: {site.python_executable}; up to {site.max_restarts} requeues")
    preamble = scheduler_for(site).job_preamble(Path(site.work_dir) / GENERATION_PLACEHOLDER, "train",
                                                Path("<run>/submitit"))
    if preamble:
        console.print("compute-node preamble of each job script:", highlight=False)
        console.print("\n".join(preamble), highlight=False, markup=False)
    from autopipec_hpc.config import resolve_command

    found = Path(resolve_command(site.pacemaker.command)).exists()
    console.print(f"pacemaker command found here: {'yes' if found else 'no (it may exist only on compute nodes)'}")
    config = TrainConfig.from_yaml(args.config)
    elements = [e.strip() for e in args.elements.split(",") if e.strip()]
    evaluator = site.pacemaker.evaluator
    if found:
        from autopipec_hpc.errors import TrainingFailedError
        from autopipec_hpc.pacemaker.environment import probe_backend
        from autopipec_hpc.preflight import resolve_evaluator

        try:
            backend = probe_backend(site.pacemaker.command)
            evaluator = resolve_evaluator(evaluator, backend, site.pacemaker.command)
            console.print(f"pacemaker here: python-ace {backend.python_ace}, tensorpotential "
                          f"{backend.tensorpotential or 'not installed'}, TensorFlow {backend.tensorflow or 'not installed'}",
                          highlight=False)
        except TrainingFailedError as exc:
            console.print(f"pacemaker's environment could not be inspected here: {exc}", highlight=False)
    plan = plan_training(config, elements, evaluator)
    console.print(f"training ({'--config ' + str(args.config) if args.config else 'default TrainConfig'}, "
                  f"elements {','.join(elements)}): {plan.describe()}", highlight=False)
    for warning in plan.warnings:
        _say(f"warning: {warning}")
    return 0


def cmd_site_template(args: argparse.Namespace) -> int:
    sys.stdout.write(site_template(args.slurm))  # plain text: no rich markup or wrapping
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Example data (or ``--data FILE``), then the whole pipeline locally: a
    100-function fit on pacemaker's TensorFlow evaluator, a tiny one on pyace."""
    from autopipec_hpc.example_data import demo_train_config, write_example_database

    site = SiteConfig.from_yaml(args.site)
    if args.loop is not None:
        return _demo_loop(args, site)
    database = args.db or site.database
    db = DatabaseManager(database)
    if db.count(status=StructureStatus.TRAINING_READY) == 0:
        if args.data:
            n = db.import_files(args.data, status=StructureStatus.TRAINING_READY)
            console.print(f"imported {n} structures from {', '.join(map(str, args.data))} into {database}")
        else:
            n = write_example_database(db)
            console.print(f"wrote {n} example copper structures (EMT labels) into {database}")
    config = TrainConfig.from_yaml(args.config) if args.config else demo_train_config(_local_evaluator(site))
    sub = submit_generation(database, site, config, None, force=False, notify=_say)
    print_dataset_summary(sub.manifest)
    console.print(f"generation {sub.spec.generation}: training and evaluation jobs {sub.jobs.train}, "
                  f"{sub.jobs.evaluate} on the {site.scheduler} executor; run folder {sub.spec.run_dir}")
    record = wait_for_generation(Path(sub.spec.run_dir), site.result_timeout_s, on_progress=ProgressPrinter())
    print_records([record], detail=True)
    return 0


DEMO_LOOP_DIR = "loop-demo"
DEMO_LABELLER = "ase.calculators.emt:EMT"


def _demo_loop(args: argparse.Namespace, site: SiteConfig) -> int:
    """The active-learning loop on the example data: EMT labels the 30 starting cells and
    whatever the loop requests from an imbalanced pool of candidates. Its own folders
    (``<work_dir>/loop-demo``, ``<output_dir>/loop-demo``), so its generations never mix
    with the plain demo's; run again, it resumes (or shows what is done)."""
    from autopipec_hpc.active.loop import run_loop
    from autopipec_hpc.active.selection import check_selection_args
    from autopipec_hpc.example_data import demo_train_config, write_example_candidates, write_example_database

    if args.loop < 1:
        raise ConfigError(f"--loop must be at least 1 generation, got {args.loop}")
    if args.pool < 1:
        raise ConfigError(f"--pool must be at least 1 candidate, got {args.pool}")
    check_selection_args(args.select, 0.0, "d-optimal", 1, max_option="--select")  # before anything is written
    if args.data:
        raise ConfigError("--data cannot go with --loop: the loop labels its picks with EMT, "
                          "which must also have labelled the starting data")
    site = site.model_copy(update={"work_dir": site.work_dir / DEMO_LOOP_DIR,
                                   "output_dir": site.output_dir / DEMO_LOOP_DIR})
    database = args.db or str(site.output_dir / "structures.db")
    db = DatabaseManager(database)  # a refused URL is named before any folder is made
    site.output_dir.mkdir(parents=True, exist_ok=True)
    if db.count() == 0:
        n = write_example_database(db)
        m = write_example_candidates(db, args.pool)
        console.print(f"wrote {n} example copper structures (EMT labels) and {m} unlabelled candidates "
                      f"into {database}")
    config = TrainConfig.from_yaml(args.config) if args.config else demo_train_config(_local_evaluator(site))
    steps = run_loop(site, database, config, args.loop, args.select, DEMO_LABELLER, notify=_say)
    console.print(f"loop: {len(steps)} steps taken; run it again to resume or to see it done")
    print_records(db.records())
    print_common_holdout(db)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.select_job import run_selection, selects_in_a_job, submit_selection
    from autopipec_hpc.active.selection import check_selection_args

    check_selection_args(args.max, args.gamma_min, args.strategy, args.batch)
    site, database = _site_and_db(args)
    DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    if args.no_wait and not selects_in_a_job(site):
        raise ConfigError(f"--no-wait: site {site.name} ({site.scheduler}) selects in this process; "
                          "there is no job to leave running")
    if args.no_wait:
        sub = submit_selection(site, database, args.generation, args.max, args.gamma_min, args.strategy,
                               args.batch, args.seed, args.out, notify=_say)
        console.print(f"select job {sub.task.job_id} submitted ({sub.task.scheduler}); its summary will be "
                      f"{sub.folder.summary_file}, its log {sub.task.stderr}", highlight=False)
        return 0
    result = run_selection(site, database, args.generation, args.max, args.gamma_min, args.strategy,
                           args.batch, args.seed, args.out, notify=_say)
    print_selection(result)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.labelling import label_requested, load_calculator_class

    load_calculator_class(args.calculator, args.kwargs)  # a bad spec is named before the database opens
    site, database = _site_and_db(args)
    DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    result = label_requested(database, args.calculator, args.kwargs, notify=_say)
    console.print(f"{len(result.labelled)} structures labelled with {args.calculator}: now TRAINING_READY")
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.labelling import load_calculator_class
    from autopipec_hpc.active.loop import run_loop
    from autopipec_hpc.active.selection import check_selection_args
    from autopipec_hpc.errors import ConfigError

    if args.generations < 1:
        raise ConfigError(f"--generations must be at least 1, got {args.generations}")
    check_selection_args(args.select, args.gamma_min, args.strategy, 1, max_option="--select")
    load_calculator_class(args.calculator, args.kwargs)  # named before anything is written
    site, database = _site_and_db(args)
    DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    config = TrainConfig.from_yaml(args.config)
    steps = run_loop(site, database, config, args.generations, args.select, args.calculator, args.kwargs,
                     args.gamma_min, args.strategy, warm=not args.cold, notify=_say)
    console.print(f"loop: {len(steps)} steps taken")
    print_records(DatabaseManager(database).records())
    print_common_holdout(DatabaseManager(database))
    return 0


def _local_evaluator(site: SiteConfig):
    """The evaluator pacemaker's environment on this machine would get."""
    from autopipec_hpc.errors import TrainingFailedError
    from autopipec_hpc.pacemaker.environment import probe_backend
    from autopipec_hpc.preflight import resolve_evaluator

    try:
        return resolve_evaluator(site.pacemaker.evaluator, probe_backend(site.pacemaker.command),
                                 site.pacemaker.command)
    except TrainingFailedError:
        return site.pacemaker.evaluator  # the preflight will name the problem

