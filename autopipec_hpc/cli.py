"""The `autopipec-hpc` command: parse, call one library function, print with rich."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest, DatasetSettings
from autopipec_hpc.db import READY, DatabaseManager
from autopipec_hpc.errors import AutopipecError, InsufficientDataError

console = Console()
err_console = Console(stderr=True)


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


def dataset_settings(config: TrainConfig, seed: int | None, test_fraction: float | None) -> DatasetSettings:
    return DatasetSettings(
        test_fraction=config.test_fraction if test_fraction is None else test_fraction,
        seed=config.seed if seed is None else seed,
        zbl_inner=config.zbl_inner,
        zbl_outer=config.zbl_outer,
        reference_energies=config.reference_energies,
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    config = TrainConfig.from_yaml(args.config)
    db = DatabaseManager(args.db)
    if db.count(status=args.status) == 0:
        raise InsufficientDataError(f"no structures with status={args.status} in {args.db}; nothing written")
    builder = DatasetBuilder(dataset_settings(config, args.seed, args.test_fraction))
    manifest = builder.prepare_dataset(db.ready_structures(args.status), args.out)
    print_dataset_summary(manifest)
    return 0


# -- presentation ---------------------------------------------------------------
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
    console.print(
        f"ZBL baseline (inner {m.zbl_inner} A, outer {m.zbl_outer} A): "
        f"{lo:.6g} .. {hi:.6g} eV per structure, {plo:.6g} .. {phi:.6g} eV/atom; "
        f"shortest pair below outer: {m.min_distance:.3f} A"
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
    parser = argparse.ArgumentParser(
        prog="autopipec-hpc",
        description="DFT-labelled structures in an ASE database -> a validated ACE potential.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="load labelled structures from ASE-readable files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--db", required=True)
    p.add_argument("--status", default=READY)
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
    p.add_argument("--status", default=READY)
    p.set_defaults(func=cmd_prepare)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except AutopipecError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
