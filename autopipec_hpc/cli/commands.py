"""The commands: each one library call, then what it prints (``show.py``).

The login-side machinery (submission, the scheduler, active learning) is imported
inside the command that needs it, so a command that fails on its input, or needs
only the database, starts in half the time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.table import Table

from autopipec_hpc.cli.show import (
    print_structures,
    ProgressPrinter,
    _coloured,
    _say,
    console,
    print_common_holdout,
    print_dataset_summary,
    print_exploration,
    print_exploration_shares,
    print_label_summary,
    print_records,
    print_selection,
    print_table,
)
from autopipec_hpc.config import LADDER_WARM_START, SiteConfig, TrainConfig, describe_validation_error
from autopipec_hpc.errors import AutopipecError, ConfigError, DatasetError
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import redact
from autopipec_hpc.templates import site_template


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
    from autopipec_hpc.submission import dataset_settings, prepare_dataset_from_db
    config = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in {"seed": args.seed, "test_fraction": args.test_fraction}.items() if v is not None}
    if overrides:
        config = _with_overrides(config, overrides)
    db = DatabaseManager(args.db, must_exist=True)
    try:
        manifest = prepare_dataset_from_db(db, dataset_settings(config), args.out, args.status,
                                           level_of_theory=config.level_of_theory)
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
    from autopipec_hpc.generation import wait_for_generation
    from autopipec_hpc.submission import submit_generation
    site, database = _site_and_db(args)
    config = TrainConfig.from_yaml(args.config)
    if args.from_generation is not None:
        config = config.model_copy(update={"warm_start": args.from_generation})
    sub = submit_generation(database, site, config, args.generation, args.force, notify=_say)
    print_dataset_summary(sub.manifest)
    console.print(
        f"generation {sub.spec.generation} submitted ({sub.jobs.scheduler}): training job {sub.jobs.train.job_id}, "
        f"evaluation job {sub.jobs.evaluate.job_id} (after training succeeds)"
        + (f", validation job {sub.jobs.validate_job.job_id} (after the evaluation)" if sub.jobs.validate_job else "")
        + f"; run folder {sub.spec.run_dir}"
    )
    if not args.wait:
        return 0
    record = wait_for_generation(Path(sub.spec.run_dir), site.result_timeout_s, on_progress=ProgressPrinter())
    print_records([record], detail=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from autopipec_hpc.generation import follow_records
    site, database = _site_and_db(args)
    db = DatabaseManager(database, must_exist=True)
    followed = follow_records(db, args.generation)  # each generation's jobs asked once, all in one query
    table = Table(title=f"training generations in {redact(database)}")
    for col in ("generation", "status", "jobs (train / evaluate)", "reason", "run folder"):
        table.add_column(col)
    for f in followed:
        r = f.record
        jobs = f.describe_jobs() if r.run_dir is not None else ""
        table.add_row(str(r.generation), _coloured(r.status), jobs, r.reason[:80], str(r.run_dir or ""))
    print_table(table)
    for f in followed:
        r = f.record
        if r.status.is_active and r.run_dir is not None:
            current = f.progress()
            line = current.describe() if current else f"generation {r.generation}: no iteration reported yet"
            console.print(line, highlight=False, markup=False)
    if args.generation is None:
        print_structures(db, site)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from autopipec_hpc.generation import follow_records
    site, database = _site_and_db(args)
    records = [f.record for f in follow_records(DatabaseManager(database, must_exist=True), args.generation)]
    if args.generation is not None:
        if not records:
            raise AutopipecError(f"no training record for generation {args.generation} in {database}")
    print_records(records, detail=args.generation is not None)
    if args.common_holdout:
        print_common_holdout(DatabaseManager(database, must_exist=True))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from autopipec_hpc.generation import cancel_generation, reconcile_generation
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


def cmd_check_site(args: argparse.Namespace) -> int:
    from autopipec_hpc.run_folder import GENERATION_PLACEHOLDER
    from autopipec_hpc.scheduler import scheduler_for
    from autopipec_hpc.submission import plan_training
    site = SiteConfig.from_yaml(args.file)
    table = Table(title=f"site {site.name}: {site.scheduler}")
    for col in ("job", "partition", "account", "qos", "GPUs", "CPUs", "memory", "time limit"):
        table.add_column(col)
    for role, res in site.job_resources().items():
        table.add_row(role, res.partition or "-", res.account or "-", res.qos or "-", str(res.gpus),
                      str(res.cpus), f"{res.mem_gb:g} GB", f"{res.time_minutes} min")
    print_table(table)
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
        from autopipec_hpc.preflight import local_evaluator

        here = local_evaluator(site)
        evaluator = here.evaluator
        if here.backend is None:
            console.print(f"pacemaker's environment could not be inspected here: {here.problem}", highlight=False)
        else:
            backend = here.backend
            console.print(f"pacemaker here: python-ace {backend.python_ace}, tensorpotential "
                          f"{backend.tensorpotential or 'not installed'}, TensorFlow {backend.tensorflow or 'not installed'}",
                          highlight=False)
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
    from autopipec_hpc.generation import wait_for_generation
    from autopipec_hpc.demo import DemoLoop, run_demo_loop, submit_demo

    if args.explore and args.loop is None:
        raise ConfigError("--explore goes with --loop K")
    site = SiteConfig.from_yaml(args.site)
    if args.loop is not None:
        # Checked before anything is written.
        demo = DemoLoop(args.loop, args.select, args.pool, args.data, args.explore)
        run = run_demo_loop(site, args.db, demo, args.config, notify=_say)
        console.print(f"loop: {len(run.steps)} steps taken; run it again to resume or to see it done")
        print_records(run.db.records())
        print_common_holdout(run.db)
        print_exploration_shares(run.db)
        return 0
    sub = submit_demo(site, args.db, args.data, args.config, notify=_say)
    print_dataset_summary(sub.manifest)
    console.print(f"generation {sub.spec.generation}: training and evaluation jobs {sub.jobs.train.job_id}, "
                  f"{sub.jobs.evaluate.job_id} on the {site.scheduler} executor; run folder {sub.spec.run_dir}")
    record = wait_for_generation(Path(sub.spec.run_dir), site.result_timeout_s, on_progress=ProgressPrinter())
    print_records([record], detail=True)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.select_job import run_selection, selects_in_a_job, submit_selection
    from autopipec_hpc.active.selection_folder import SelectionRequest

    request = SelectionRequest(generation=args.generation, max_select=args.max, gamma_min=args.gamma_min,
                               strategy=args.strategy, batch=args.batch, seed=args.seed, out_dir=args.out,
                               max_atoms=args.max_atoms, again=args.again)
    site, database = _site_and_db(args)
    if args.no_wait and not selects_in_a_job(site):
        raise ConfigError(f"--no-wait: site {site.name} ({site.scheduler}) selects in this process; "
                          "there is no job to leave running")
    db = DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    if args.no_wait:
        sub = submit_selection(site, db, request, notify=_say)
        console.print(f"select job {sub.task.job_id} submitted ({sub.task.scheduler}); its summary will be "
                      f"{sub.folder.summary_file}, its log {sub.task.stderr}", highlight=False)
        return 0
    print_selection(run_selection(site, db, request, notify=_say))
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.explore_job import finish_exploration, start_exploration
    from autopipec_hpc.active.explore_plan import ExplorePlan

    plan = ExplorePlan.from_yaml(args.plan)  # checked before anything is opened
    site, database = _site_and_db(args)
    db = DatabaseManager(database, must_exist=True)
    run = start_exploration(site, db, plan, args.generation, notify=_say)
    if args.no_wait:
        ids = ", ".join(t.job_id for t in run.tasks) or "none (every trajectory is harvested)"
        console.print(f"exploration tasks {ids}; explore again to follow them and import the harvest "
                      f"({run.folder.path})", highlight=False)
        return 0
    print_exploration(finish_exploration(site, db, run.folder, args.generation, notify=_say))
    return 0


def cmd_plan_template(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.explore_plan import plan_template

    sys.stdout.write(plan_template())  # plain text: no rich markup or wrapping
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.label_array import run_labels, submit_labels
    from autopipec_hpc.active.labeller_config import load_labeller

    labeller = load_labeller(args.labeller, args.calculator, args.kwargs)  # named before the database opens
    site, database = _site_and_db(args)
    db = DatabaseManager(database, must_exist=True)
    if args.no_wait:
        sub = submit_labels(site, db, labeller, retry_failed=args.retry_failed, notify=_say)
        if sub is not None:
            console.print(f"label array submitted: {len(sub.jobs)} tasks, first {sub.jobs[0].job_id}; "
                          f"its summary will be {sub.folder.summary_file}", highlight=False)
            return 0
        summary = None
    else:
        summary = run_labels(site, db, labeller, retry_failed=args.retry_failed, notify=_say)
    if summary is None:
        console.print("nothing to label: no DFT_REQUESTED structures", highlight=False)
    else:
        print_label_summary(summary)
    return 0


def cmd_labeller_template(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.labeller_config import labeller_template

    sys.stdout.write(labeller_template(gpaw=args.gpaw))
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from autopipec_hpc.active.loop import LoopSettings, run_loop

    settings = LoopSettings(generations=args.generations, select=args.select, calculator=args.calculator,
                            kwargs=args.kwargs, labeller_file=args.labeller, gamma_min=args.gamma_min,
                            strategy=args.strategy, warm=not args.cold, seed=args.seed, max_atoms=args.max_atoms,
                            plan=args.plan, converge=args.converge)  # checked before anything is opened or written
    site, database = _site_and_db(args)
    config = TrainConfig.from_yaml(args.config)
    if settings.warm and config.ladder_step is not None:
        # Refused before generation 1 is trained, not when generation 2 would start from it.
        raise ConfigError(f"loop: {LADDER_WARM_START}, or run the loop with --cold")
    db = DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    steps = run_loop(site, db, config, settings, notify=_say)
    console.print(f"loop: {len(steps)} steps taken")
    print_records(db.records())
    print_common_holdout(db)
    return 0
