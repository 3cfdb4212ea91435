"""What the commands print: tables of records, datasets, selections, and the fit's progress."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table
from typing import TYPE_CHECKING

from autopipec_hpc.states import RecordState

if TYPE_CHECKING:  # annotations only: a command imports what it prints when it runs
    from autopipec_hpc.active.label_folder import LabelSummary
    from autopipec_hpc.active.explore_report import ExploreSummary
    from autopipec_hpc.active.selection import SelectionResult
    from autopipec_hpc.dataset_prep import DatasetManifest
    from autopipec_hpc.generation import GenerationProgress
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.store.records import TrainingRecord


# Piped output (logs, CI, grep) gets wide tables instead of rich's 80 columns. COLUMNS is
# not trusted there: a parent that loaded GNU readline exports COLUMNS=80 to its children.
console = Console(width=None if sys.stdout.isatty() else 200)


err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _say(message: str) -> None:
    style = "yellow" if message.startswith("warning:") else None
    console.print(message, style=style, highlight=False, markup=False)


def print_table(table: Table) -> None:
    """``table`` with its title on a line of its own, never wrapped by rich: a title is
    fitted to its table's width, which on a narrow terminal broke a path into pieces
    ("runs/gen-0001/dat" / "aset")."""
    title, table.title = table.title, None
    if title:
        console.print(title, soft_wrap=True, highlight=False, markup=False, style="bold")
    console.print(table)


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


# Fewer structures than this cannot rank generations: one odd frame decides the order.
FEW_HOLDOUT_STRUCTURES = 20


def print_common_holdout(db: DatabaseManager) -> None:
    from autopipec_hpc.evaluation import compare_on_common_holdout

    compared = compare_on_common_holdout(db)
    n = len(compared.ids)
    if compared.fixed:
        source = (f"the fixed holdout ({compared.fixed}): {n} of its {compared.fixed_size} structures, "
                  "those every generation held out")
    else:
        source = "the intersection of their holdouts"
    table = Table(title=f"every published generation on the same {n} holdout structures "
                        f"({source}; ACE + ZBL + reference energies vs labels)")
    for col in ("gen", "parent", "structures", "E RMSE meV/at", "F RMSE meV/A", "worst F error meV/A",
                *VALIDATION_HEADLINE):
        table.add_column(col)
    records = {r.generation: r for r in db.records()}
    for r in compared.rows:
        table.add_row(str(r.generation), str(r.parent_generation or "-"), str(r.structures),
                      _fmt(r.energy_rmse_mev), _fmt(r.force_rmse_mev, 1), _fmt(r.force_max_mev, 1),
                      *_headline(records.get(r.generation)))
    print_table(table)
    if compared.rows and n < FEW_HOLDOUT_STRUCTURES:
        hint = ("" if compared.fixed else "; name a fixed holdout for the whole loop in the training config: "
                "holdout: {config_type: NAME} or holdout: {file: HOLDOUT.extxyz}")
        _say(f"warning: the generations are compared on only {n} structures, too few to rank them{hint}")


def print_selection(result: SelectionResult) -> None:
    table = Table(title=f"candidates scored by generation {result.generation} ({result.strategy}, "
                        f"gamma > {result.gamma_min:g}, at most {result.max_select}"
                        f"{f' and {result.max_atoms} atoms' if result.max_atoms else ''})")
    for col in ("config_type", "scored", "median max gamma", "largest gamma", "gamma > min", "gamma > 5",
                "selected"):
        table.add_column(col, justify="right" if col != "config_type" else "left")
    for ctype, c in result.by_config_type.items():
        table.add_row(ctype, str(c.scored), _fmt(c.gamma_max_median), _fmt(c.gamma_max_max),
                      str(c.above_gamma_min), str(c.above_5), str(c.selected))
    table.add_row("[b]total", f"[b]{result.scored}", "", "", f"[b]{result.above}",
                  f"[b]{sum(c.above_5 for c in result.by_config_type.values())}",
                  f"[b]{len(result.selected_ids)}")
    print_table(table)
    if result.unusable:
        named = "; ".join(f"id={i}: {why}" for i, why in sorted(result.unusable.items()))
        console.print(f"skipped {len(result.unusable)} candidates that cannot be scored: {named}",
                      highlight=False, markup=False)
    if result.skipped:
        named = ", ".join(f"id={i} ({'/'.join(els)})" for i, els in sorted(result.skipped.items()))
        console.print(f"skipped {len(result.skipped)} candidates with elements the potential does not know: {named}",
                      highlight=False)
    figures = ", ".join(result.histograms) or "no figure"
    console.print(f"{len(result.selected_ids)} structures now DFT_REQUESTED ({result.selected_atoms} atoms to "
                  f"label); summary and gamma histograms "
                  f"({figures}) in {result.folder}", highlight=False)


def print_label_summary(summary: LabelSummary) -> None:
    """One line for the step, then one per failed structure with its reason."""
    console.print(f"{summary.describe()}; folder {summary.folder}", highlight=False, markup=False)
    for row_id, reason in sorted(summary.failed.items()):
        console.print(f"  LABEL_FAILED id={row_id}: {reason}", highlight=False, markup=False)


def print_exploration(summary: "ExploreSummary") -> None:
    from autopipec_hpc.states import StopReason

    table = Table(title=f"exploration with generation {summary.generation} (accurate: max gamma <= "
                        f"{summary.gamma_lo:g}, candidates up to {summary.gamma_hi:g})")
    for col in ("ensemble, T", "trajectories", "frames seen", "accurate", "candidates", "beyond trust", "kept",
                "trajectories stopped by"):
        table.add_column(col, justify="left" if col in ("ensemble, T", "trajectories stopped by") else "right")
    for name, c in [*summary.groups.items(), ("[b]total", summary.total)]:
        stops = ", ".join(f"{r.value} {c.stops[r.value]}" for r in StopReason if c.stops.get(r.value))
        table.add_row(name, str(c.trajectories), str(c.seen), f"{c.accurate} ({c.accurate_share:.0%})",
                      str(c.candidates), str(c.beyond), str(c.kept), stops)
    print_table(table)
    console.print(f"{summary.imported} frames now CANDIDATE rows; accurate share {summary.accurate_share:.3f}; "
                  f"summary and {summary.figure or 'no figure'} in {summary.folder}", highlight=False)


def print_exploration_shares(db: "DatabaseManager") -> None:
    """Each explored generation's accurate share, from its ``record=exploration`` row."""
    rows = db.markers("exploration")
    if not rows:
        return
    table = Table(title="explorations: share of frames seen that the generation knows (max gamma <= gamma_lo)")
    for col in ("gen", "frames seen", "accurate share", "candidates", "imported", "trajectories stopped"):
        table.add_column(col, justify="right")
    for row in rows:
        stops = ", ".join(f"{k[len('n_stop_'):]} {row.get(k)}" for k in sorted(row.key_value_pairs)
                          if k.startswith("n_stop_") and row.get(k))
        table.add_row(str(row.generation), str(row.get("n_seen", 0)), f"{float(row.get('accurate_share', 0)):.3f}",
                      str(row.get("n_candidates", 0)), str(row.get("n_imported", 0)), stops)
    print_table(table)


# -- presentation ---------------------------------------------------------------
RECORD_COLOURS = {RecordState.SUCCEEDED: "green", RecordState.FAILED: "red", RecordState.DIVERGED: "red",
                  RecordState.CANCELLED: "yellow", RecordState.REJECTED: "red"}


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
    print_table(table)
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
            print_table(per)
        print_validation(r)
        if r.log_tail:
            console.print(f"[b]log tail of generation {r.generation}:[/b]\n{r.log_tail}", highlight=False)


# The validation's headline figures beside the holdout (validate/; the first element's, named).
VALIDATION_HEADLINE = ("validated", "a0 A", "B0 GPa", "C11/C12/C44 GPa", "vacancy eV", "hot MD closest A")


def _headline(r: TrainingRecord | None) -> tuple[str, ...]:
    if r is None or r.validation is None:
        return ("-",) * len(VALIDATION_HEADLINE)
    return (r.validation_element or "-", _fmt(r.validation_a0, 3), _fmt(r.validation_b0_gpa, 0),
            "/".join(_fmt(c, 0) for c in (r.validation_c11_gpa, r.validation_c12_gpa, r.validation_c44_gpa)),
            _fmt(r.validation_vacancy_ev), _fmt(r.validation_md_min_distance))


def _with_ref(value: float | None, ref: float | None, digits: int) -> str:
    return _fmt(value, digits) + (f" ({_fmt(ref, digits)})" if ref is not None else "")


def print_validation(r: TrainingRecord) -> None:
    """The validation table of a generation (validation.json of its run folder): per element,
    per dimer, and the verdict."""
    from pathlib import Path

    from autopipec_hpc.validate.report import ValidationReport

    report = ValidationReport.load(Path(r.run_dir) / "validation") if r.run_dir else None
    if report is None:
        return
    table = Table(title=f"generation {r.generation} validation (reference in brackets)")
    for col in ("element", "a0 A", "B0 GPa", "reference", "C11", "C12", "C44", "Born", "vacancy eV",
                "hot MD", "closest A", "NVE drift meV/at/ps"):
        table.add_column(col)
    for e in report.elements:
        eos = e.eos
        table.add_row(f"{e.element} {e.phase}", _with_ref(eos.a0, eos.ref_a0, 3) if eos else "-",
                      _with_ref(eos.b0_gpa, eos.ref_b0_gpa, 0) if eos else "-", (eos.reference or "-") if eos else "-",
                      _fmt(e.c11_gpa, 0), _fmt(e.c12_gpa, 0), _fmt(e.c44_gpa, 0),
                      "-" if e.born_stable is None else ("stable" if e.born_stable else "UNSTABLE"),
                      _fmt(e.vacancy_ev), f"{_fmt(e.md_temperature_k, 0)} K: {e.md_failure or 'stable'}",
                      _fmt(e.md_min_distance), _fmt(e.md_nve_drift_mev_per_atom_ps))
    print_table(table)
    phases = [(e.element, p) for e in report.elements for p in e.phases]
    if phases:
        other = Table(title=f"generation {r.generation} other phases: potential (DFT) on the DFT cells")
        for col in ("element", "phase", "set", "V0 A^3/atom", "B0 GPa", "above the ground state meV/atom"):
            other.add_column(col)
        for element, p in phases:
            other.add_row(element, p.phase, p.reference, _with_ref(p.v0, p.ref_v0, 2), _with_ref(p.b0_gpa, p.ref_b0_gpa, 0),
                          _with_ref(p.above_ground_mev, p.ref_above_ground_mev, 1))
        print_table(other)
    dimers = Table(title=f"generation {r.generation} dimers")
    for col in ("pair", "first minimum at A", "E at check eV", "check at A", "repulsive"):
        dimers.add_column(col)
    for d in report.dimers:
        dimers.add_row(d.pair, _fmt(d.r_min), _fmt(d.energy_at_check), _fmt(d.check_distance),
                       "yes" if d.repulsive else f"no (a well closer than {_fmt(d.min_floor)} A)")
    print_table(dimers)
    console.print(f"{report.one_line()} ({report.wall_time_s:.0f} s)", highlight=False, markup=False)


def print_dataset_summary(m: DatasetManifest) -> None:
    table = Table(title=f"dataset in {m.directory}")
    table.add_column("config_type")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for ctype in sorted(set(m.train_counts) | set(m.test_counts)):
        table.add_row(ctype, str(m.train_counts.get(ctype, 0)), str(m.test_counts.get(ctype, 0)))
    table.add_row("[b]total", f"[b]{len(m.train_ids)}", f"[b]{len(m.test_ids)}")
    print_table(table)
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
        print_table(skipped)
    else:
        console.print("skipped structures: 0")
    files = m.train_files + m.test_files + [f for f in (m.train_extxyz, m.test_extxyz) if f]
    console.print("files: " + ", ".join(files) + ", dataset.json")


def print_structures(db: "DatabaseManager", site) -> None:
    """The structure rows by status, and the label arrays holding rows now (a `label
    --no-wait` is followed here as a generation is)."""
    from autopipec_hpc.active.label_array import labelling_now
    from autopipec_hpc.states import StructureStatus

    now = labelling_now(db, site)  # first: it reconciles the rows of tasks that ended
    counts = [(status, db.count(status=status)) for status in StructureStatus]
    shown = ", ".join(f"{n} {status}" for status, n in counts if n)
    console.print(f"structures: {shown or 'none'}", highlight=False, markup=False)
    for held in now:
        tasks = f"label task{'s' if len(held.jobs) != 1 else ''} {', '.join(held.jobs)}" if held.jobs else "a labeller"
        console.print(f"labelling: {held.rows} held by {tasks} ({held.folder})", highlight=False, markup=False)
