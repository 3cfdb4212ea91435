"""The `autopipec-hpc` command: parse, call one library function, print with rich."""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from autopipec_hpc import __version__
from autopipec_hpc.config import SiteConfig, TrainConfig, describe_validation_error
from autopipec_hpc.dataset_prep import DatasetManifest
from autopipec_hpc.db import DatabaseManager, RecordState, StructureStatus, TrainingRecord, redact
from autopipec_hpc.errors import AutopipecError, ConfigError, DatasetError
from autopipec_hpc.run_folder import GENERATION_PLACEHOLDER, RunFolder
from autopipec_hpc.scheduler import scheduler_for
from autopipec_hpc.submission import (
    GenerationProgress,
    cancel_generation,
    describe_jobs,
    reconcile_generation,
    dataset_settings,
    find_run,
    generation_progress,
    job_states,
    plan_training,
    prepare_dataset_from_db,
    submit_generation,
    wait_for_generation,
)

# The top-level site_configs/ folder, packaged into the wheel under this name (pyproject.toml).
SITE_CONFIGS = "autopipec_hpc.site_configs"


def packaged_site(name: str) -> Path:
    """A site config installed with the package, e.g. ``local.yaml``."""
    return Path(str(importlib.resources.files(SITE_CONFIGS).joinpath(name)))


DEFAULT_SITE = packaged_site("local.yaml")
SLURM_EXAMPLE_SITE = "example-gpu-cluster.yaml"

# Piped output (logs, CI, grep) gets wide tables instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


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


def _say(message: str) -> None:
    style = "yellow" if message.startswith("warning:") else None
    console.print(message, style=style, highlight=False, markup=False)


class ProgressPrinter:
    """Prints the fit's progress as it runs: every new state on a terminal, at most
    one line every ``interval_s`` (and each new attempt) in a log or pipe."""

    def __init__(self, interval_s: float | None = None) -> None:
        self.interval_s = (2.0 if console.is_terminal else 10.0) if interval_s is None else interval_s
        self._last_at = 0.0
        self._last_attempt = 0

    def __call__(self, current: GenerationProgress) -> None:
        now = time.monotonic()
        done = current.progress.iteration >= current.progress.maxiter
        if now - self._last_at < self.interval_s and current.attempt == self._last_attempt and not done:
            return
        self._last_at, self._last_attempt = now, current.attempt
        console.print(current.describe(), highlight=False, markup=False)


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


def print_common_holdout(db: DatabaseManager) -> None:
    from autopipec_hpc.active_learning import common_holdout

    common, rows = common_holdout(db)
    table = Table(title=f"every published generation on the same {len(common)} holdout structures "
                        "(the intersection of their holdouts; ACE + ZBL + reference energies vs labels)")
    for col in ("gen", "parent", "structures", "E RMSE meV/at", "F RMSE meV/A", "worst F error meV/A"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.generation), str(r.parent_generation or "-"), str(r.structures),
                      _fmt(r.energy_rmse_mev), _fmt(r.force_rmse_mev, 1), _fmt(r.force_max_mev, 1))
    console.print(table)


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
        from autopipec_hpc.pacemaker_wrapper import probe_backend
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


def site_template(slurm: bool = False) -> str:
    """The commented site config to start from: the packaged local or SLURM example."""
    name = SLURM_EXAMPLE_SITE if slurm else DEFAULT_SITE.name
    body = packaged_site(name).read_text()
    header = f"# site_configs/{name} of autopipec-hpc {__version__}; check your copy: autopipec-hpc check-site FILE\n"
    return header + body


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
    from autopipec_hpc.active_learning import check_selection_args, run_loop
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
    from autopipec_hpc.active_learning import check_selection_args, run_selection, selects_in_a_job, submit_selection

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
    from autopipec_hpc.active_learning import label_requested, load_calculator_class

    load_calculator_class(args.calculator, args.kwargs)  # a bad spec is named before the database opens
    site, database = _site_and_db(args)
    DatabaseManager(database, must_exist=True)  # a read: never create an empty database
    result = label_requested(database, args.calculator, args.kwargs, notify=_say)
    console.print(f"{len(result.labelled)} structures labelled with {args.calculator}: now TRAINING_READY")
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from autopipec_hpc.active_learning import check_selection_args, load_calculator_class, run_loop
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


def print_selection(result) -> None:
    table = Table(title=f"candidates scored by generation {result.generation} ({result.strategy}, "
                        f"gamma > {result.gamma_min:g}, at most {result.max_select})")
    for col in ("config_type", "scored", "median max gamma", "largest gamma", "gamma > min", "gamma > 5",
                "selected"):
        table.add_column(col, justify="right" if col != "config_type" else "left")
    for ctype, c in result.by_config_type.items():
        table.add_row(ctype, str(c["scored"]), _fmt(c["gamma_max_median"]), _fmt(c["gamma_max_max"]),
                      str(c["above_gamma_min"]), str(c["above_5"]), str(c["selected"]))
    table.add_row("[b]total", f"[b]{result.scored}", "", "", f"[b]{result.above}",
                  f"[b]{sum(c['above_5'] for c in result.by_config_type.values())}",
                  f"[b]{len(result.selected_ids)}")
    console.print(table)
    if result.skipped:
        named = ", ".join(f"id={i} ({'/'.join(els)})" for i, els in sorted(result.skipped.items()))
        console.print(f"skipped {len(result.skipped)} candidates with elements the potential does not know: {named}",
                      highlight=False)
    console.print(f"{len(result.selected_ids)} structures now DFT_REQUESTED; summary and gamma histograms in "
                  f"{result.folder}", highlight=False)


def _local_evaluator(site: SiteConfig):
    """The evaluator pacemaker's environment on this machine would get."""
    from autopipec_hpc.errors import TrainingFailedError
    from autopipec_hpc.pacemaker_wrapper import probe_backend
    from autopipec_hpc.preflight import resolve_evaluator

    try:
        return resolve_evaluator(site.pacemaker.evaluator, probe_backend(site.pacemaker.command),
                                 site.pacemaker.command)
    except TrainingFailedError:
        return site.pacemaker.evaluator  # the preflight will name the problem


# -- presentation ---------------------------------------------------------------
RECORD_COLOURS = {RecordState.SUCCEEDED: "green", RecordState.FAILED: "red", RecordState.DIVERGED: "red",
                  RecordState.CANCELLED: "yellow"}


def _coloured(status: RecordState) -> str:
    colour = RECORD_COLOURS.get(status, "cyan")
    return f"[{colour}]{status}[/{colour}]"


def _fmt(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def print_records(records: list[TrainingRecord], detail: bool = False) -> None:
    table = Table(title="training results (holdout: ACE + ZBL + reference energies vs DFT)")
    for col in ("gen", "parent", "status", "E RMSE meV/at", "E MAE meV/at", "F RMSE meV/A", "train E / F",
                "iters", "wall s", "potential / reason"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r.generation), str(r.values.get("parent_generation") or "-"), _coloured(r.status),
            _fmt(r.test_energy_rmse_mev), _fmt(r.test_energy_mae_mev), _fmt(r.test_force_rmse_mev, 1),
            f"{_fmt(r.train_energy_rmse_mev)} / {_fmt(r.train_force_rmse_mev, 1)}",
            str("-" if r.iterations is None else r.iterations), _fmt(r.wall_time_s, 0),
            str(r.potential_path or r.reason),
        )
    console.print(table)
    console.print("force errors are per Cartesian component")
    for r in records if detail else []:
        metrics = r.metrics
        if metrics:
            per = Table(title=f"generation {r.generation} holdout per config_type")
            for col in ("config_type", "structures", "E RMSE (residual)", "E RMSE (total)",
                        "E MAE (total)", "F RMSE (residual)", "F RMSE (total)"):
                per.add_column(col)
            for ct, tot in metrics["total_by_config_type"].items():
                res = metrics["residual_by_config_type"][ct]
                per.add_row(ct, str(tot["structures"]), _fmt(res["energy_rmse_mev"]),
                            _fmt(tot["energy_rmse_mev"]), _fmt(tot["energy_mae_mev"]),
                            _fmt(res["force_rmse_mev"], 1), _fmt(tot["force_rmse_mev"], 1))
            console.print(per)
        if r.log_tail:
            console.print(f"[b]log tail of generation {r.generation}:[/b]\n{r.log_tail}", highlight=False)

def print_dataset_summary(m: DatasetManifest) -> None:
    table = Table(title=f"dataset in {m.directory}")
    table.add_column("config_type")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for ctype in sorted(set(m.train_counts) | set(m.test_counts)):
        table.add_row(ctype, str(m.train_counts.get(ctype, 0)), str(m.test_counts.get(ctype, 0)))
    table.add_row("[b]total", f"[b]{len(m.train_ids)}", f"[b]{len(m.test_ids)}")
    console.print(table)
    if m.single_structure_types:
        console.print(
            "single-structure config_types (training only): " + ", ".join(m.single_structure_types)
        )
    refs = ", ".join(f"{el}: {e:.6f} eV" for el, e in m.reference_energies.items())
    console.print(f"reference energies ({m.reference_energies_source}): {refs}")
    lo, hi = m.zbl_energy_range
    plo, phi = m.zbl_energy_per_atom_range
    shortest = f"{m.min_distance:.3f} A" if m.min_distance != float("inf") else "none closer than outer"
    console.print(
        f"ZBL baseline (inner {m.zbl_inner} A, outer {m.zbl_outer} A): "
        f"{lo:.6g} .. {hi:.6g} eV per structure, {plo:.6g} .. {phi:.6g} eV/atom; "
        f"shortest pair: {shortest}"
    )
    tlo, thi = m.target_energy_per_atom_range
    console.print(f"delta targets: {tlo:.4f} .. {thi:.4f} eV/atom")
    if m.skipped:
        skipped = Table(title=f"skipped structures: {len(m.skipped)}")
        skipped.add_column("db id", justify="right")
        skipped.add_column("config_type")
        skipped.add_column("reason")
        for s in m.skipped:
            skipped.add_row(str(s.db_id), s.config_type, s.reason)
        console.print(skipped)
    else:
        console.print("skipped structures: 0")
    files = m.train_files + m.test_files + [f for f in (m.train_extxyz, m.test_extxyz) if f]
    console.print("files: " + ", ".join(files) + ", dataset.json")


# -- parser ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="autopipec-hpc",
        description="DFT-labelled structures in an ASE database -> a validated ACE potential.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (also: AUTOPIPEC_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="load labelled structures from ASE-readable files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--db", required=True)
    p.add_argument("--status", default=StructureStatus.TRAINING_READY.value)
    p.add_argument("--config-type", default=None, help="override each frame's config_type")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("example-data", help="write a small EMT copper dataset into a database")
    p.add_argument("--db", required=True)
    p.set_defaults(func=cmd_example_data)

    p = sub.add_parser("prepare", help="build the ZBL-delta train/test datasets")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    p.add_argument("--status", default=StructureStatus.TRAINING_READY.value)
    p.set_defaults(func=cmd_prepare)

    def site_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--site", type=Path, default=DEFAULT_SITE,
                       help="site config YAML (default: the packaged local site, see site-template)")
        p.add_argument("--db", default=None, help="database (default: the site's)")

    p = sub.add_parser("submit", help="prepare datasets, submit training and its evaluation")
    site_args(p)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML")
    p.add_argument("--generation", type=_generation, default=None, help="default: one more than the last")
    p.add_argument("--wait", action="store_true", help="wait for the result and show it")
    p.add_argument("--force", action="store_true", help="retrain a generation that succeeded")
    p.add_argument("--from-generation", type=int, default=None,
                   help="warm start: begin from this published generation's potential")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="generations and their jobs")
    site_args(p)
    p.add_argument("--generation", type=_generation, default=None)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="metrics of finished generations")
    site_args(p)
    p.add_argument("--generation", type=_generation, default=None)
    p.add_argument("--common-holdout", action="store_true",
                   help="also evaluate every published generation on the holdout rows they share")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("cancel", help="cancel a generation's jobs")
    site_args(p)
    p.add_argument("--generation", type=_generation, required=True)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("check-site", help="validate a site config and show what would be submitted")
    p.add_argument("file", type=Path)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML whose basis size to show")
    p.add_argument("--elements", default="Cu", help="comma-separated elements to count parameters for")
    p.set_defaults(func=cmd_check_site)

    p = sub.add_parser("site-template", help="print a commented site config to copy and edit")
    p.add_argument("--slurm", action="store_true", help="a SLURM GPU cluster instead of this machine")
    p.set_defaults(func=cmd_site_template)

    p = sub.add_parser("demo", help="example data and a quick end-to-end run")
    site_args(p)
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="labelled structures to train on (default: 30 EMT copper cells made on the spot)")
    p.add_argument("--config", type=Path, default=None, help="default: a small quick fit")
    p.add_argument("--loop", type=int, default=None, metavar="K",
                   help="run the active-learning loop for K generations on EMT copper instead "
                        "(own folders: <work_dir>/loop-demo, <output_dir>/loop-demo)")
    p.add_argument("--select", type=int, default=10, help="with --loop: structures to label per generation")
    p.add_argument("--pool", type=int, default=200, help="with --loop: unlabelled candidates to start with")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("select", help="score candidates by extrapolation grade; request labels for the best")
    site_args(p)
    p.add_argument("--generation", type=int, required=True, help="the published generation that scores")
    p.add_argument("--max", type=int, default=20, help="structures to choose at most (default 20)")
    p.add_argument("--gamma-min", type=float, default=1.0, help="only candidates above this max gamma (default 1)")
    p.add_argument("--strategy", default="d-optimal", help="d-optimal (default), top-gamma or random")
    p.add_argument("--batch", type=int, default=200, help="candidates scored and offered to MaxVol at a time")
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--out", type=Path, default=None, help="summary folder (default: <output>/selections/gen-N)")
    p.add_argument("--no-wait", action="store_true",
                   help="on a SLURM site: print the select job's id and where its summary will be, and return")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("loop", help="train -> evaluate -> select -> label -> train warm-started, resumable")
    site_args(p)
    p.add_argument("--generations", type=int, required=True, help="stop when this generation is published")
    p.add_argument("--select", type=int, required=True, help="structures to label per generation at most")
    p.add_argument("--calculator", required=True, help="MODULE:CLASS that labels, e.g. ase.calculators.emt:EMT")
    p.add_argument("--kwargs", default=None, help="the calculator's keyword arguments as a JSON object")
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML (warm_start is set by the loop)")
    p.add_argument("--gamma-min", type=float, default=1.0)
    p.add_argument("--strategy", default="d-optimal", help="d-optimal (default), top-gamma or random")
    p.add_argument("--cold", action="store_true", help="train every generation from scratch")
    p.set_defaults(func=cmd_loop)

    p = sub.add_parser("label", help="label DFT_REQUESTED structures with an ASE calculator")
    site_args(p)
    p.add_argument("--calculator", required=True, help="MODULE:CLASS, e.g. ase.calculators.emt:EMT")
    p.add_argument("--kwargs", default=None, help="the calculator's keyword arguments as a JSON object")
    p.set_defaults(func=cmd_label)

    return parser


def _generation(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"generation must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"generation must be 1 or more, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2 like every other one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(args.debug or os.environ.get("AUTOPIPEC_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except AutopipecError as exc:
        if debug:
            raise
        _error_line(str(exc))
        return 2
    except OSError as exc:
        # A file or folder the user named that cannot be read or written.
        if debug:
            raise
        where = exc.filename or "a file"
        _error_line(f"{where}: {exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug, not a mistake of the user's: say so, in one line
        if debug:
            raise
        reason = " ".join(str(exc).split())[:300]
        _error_line(f"internal error (a bug in autopipec-hpc): {type(exc).__name__}: {reason}; "
                    "rerun with --debug (or AUTOPIPEC_DEBUG=1) for the traceback")
        return 1


def _error_line(message: str) -> None:
    """One line on stderr, however long or multi-line the message was."""
    text = " ".join(message.split())
    sys.stderr.write(f"error: {text}\n")


if __name__ == "__main__":
    sys.exit(main())
