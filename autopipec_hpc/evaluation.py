"""Holdout evaluation of a fitted potential, overall and per config_type.

Two views of the same test structures:
- residual: the ACE model alone against the delta targets it was trained on;
- total: the deployed calculator (ACE + ZBL + reference energies, exactly
  what ``registry.load_calculator`` returns) against the raw DFT labels.
They agree when the baseline published is the baseline subtracted; a gap
between them is a bug in deployment, which is why both are reported.

Energies in meV/atom; forces in meV/Angstrom per Cartesian component.
"""

from __future__ import annotations

from autopipec_hpc import registry
from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator

from autopipec_hpc.dataset_files import read_pickle
from autopipec_hpc.files import atomic_output, atomic_write_text

log = logging.getLogger(__name__)

FORCE_ERROR_CONVENTION = "per Cartesian component"


@dataclass
class ErrorStats:
    structures: int
    atoms: int
    energy_rmse_mev: float
    energy_mae_mev: float
    force_rmse_mev: float
    force_mae_mev: float


@dataclass
class Predictions:
    """Per-structure energies per atom and per-component forces, with labels, in eV units."""

    config_type: list[str] = field(default_factory=list)
    natoms: list[int] = field(default_factory=list)
    e_pred: list[float] = field(default_factory=list)
    e_ref: list[float] = field(default_factory=list)
    f_pred: list[np.ndarray] = field(default_factory=list)
    f_ref: list[np.ndarray] = field(default_factory=list)

    def add(self, ctype: str, natoms: int, e_pred: float, e_ref: float,
            f_pred: np.ndarray, f_ref: np.ndarray, force_mask: np.ndarray | None) -> None:
        keep = slice(None) if force_mask is None else np.asarray(force_mask) > 0
        self.config_type.append(ctype)
        self.natoms.append(natoms)
        self.e_pred.append(e_pred / natoms)
        self.e_ref.append(e_ref / natoms)
        self.f_pred.append(np.asarray(f_pred)[keep].ravel())
        self.f_ref.append(np.asarray(f_ref)[keep].ravel())

    def stats(self, select: Sequence[bool] | None = None) -> ErrorStats:
        idx = [k for k in range(len(self.e_pred)) if select is None or select[k]]
        de = np.array([self.e_pred[k] - self.e_ref[k] for k in idx]) * 1000.0
        df = np.concatenate([self.f_pred[k] - self.f_ref[k] for k in idx] or [np.zeros(0)]) * 1000.0
        return ErrorStats(
            structures=len(idx),
            atoms=int(sum(self.natoms[k] for k in idx)),
            energy_rmse_mev=_rms(de),
            energy_mae_mev=float(np.abs(de).mean()) if len(de) else math.nan,
            force_rmse_mev=_rms(df),
            force_mae_mev=float(np.abs(df).mean()) if len(df) else math.nan,
        )

    def by_config_type(self) -> dict[str, ErrorStats]:
        return {
            ct: self.stats([c == ct for c in self.config_type]) for ct in sorted(set(self.config_type))
        }


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if len(x) else math.nan


@dataclass
class EvaluationReport:
    residual: ErrorStats
    total: ErrorStats
    residual_by_config_type: dict[str, ErrorStats]
    total_by_config_type: dict[str, ErrorStats]
    units: dict[str, str] = field(
        default_factory=lambda: {"energy": "meV/atom", "force": f"meV/Angstrom, {FORCE_ERROR_CONVENTION}"}
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path, extra: dict | None = None) -> None:
        payload = {**self.to_dict(), **(extra or {})}
        atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=True))


def predict(
    test_files: Iterable[Path], ace: Calculator, deployed: Calculator
) -> tuple[Predictions, Predictions]:
    """Residual (ACE vs targets) and total (deployed vs DFT) predictions on the test files."""
    residual, total = Predictions(), Predictions()
    for path in test_files:
        df = read_pickle(path)
        masks = df["w_forces"] if "w_forces" in df else [None] * len(df)
        for (_, row), mask in zip(df.iterrows(), masks):
            atoms = row["ase_atoms"].copy()
            n = len(atoms)
            atoms.calc = ace
            e_ace, f_ace = atoms.get_potential_energy(), atoms.get_forces()
            residual.add(row["config_type"], n, e_ace, row["energy_corrected"], f_ace, row["forces"], mask)
            atoms = row["ase_atoms"].copy()
            atoms.calc = deployed
            total.add(row["config_type"], n, atoms.get_potential_energy(), row["energy_dft"],
                      atoms.get_forces(), row["forces_dft"], mask)
    return residual, total


def pacemaker_prediction_stats(pred_file: Path) -> ErrorStats | None:
    """Errors from pacemaker's own test-set predictions (``pacemaker_wrapper.TEST_PREDICTIONS``:
    ACE alone vs targets).

    A cross-check of the residual view: same potential, same structures,
    pacemaker's evaluator instead of ours.
    """
    if not pred_file.exists():
        return None
    df = read_pickle(pred_file)
    pred = Predictions()
    for _, row in df.iterrows():
        n = len(row["forces"])
        pred.add(row["config_type"], n, row["energy_pred"], row["energy_corrected"],
                 row["forces_pred"], row["forces"], None)
    return pred.stats()


def evaluate(test_files: Sequence[Path], ace: Calculator, deployed: Calculator) -> tuple[EvaluationReport, Predictions]:
    residual, total = predict(test_files, ace, deployed)
    report = EvaluationReport(
        residual=residual.stats(),
        total=total.stats(),
        residual_by_config_type=residual.by_config_type(),
        total_by_config_type=total.by_config_type(),
    )
    return report, total


def parity_plot(pred: Predictions, path: Path, title: str) -> None:
    """Energy and force parity (predicted vs DFT), coloured by config_type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_f) = plt.subplots(1, 2, figsize=(10, 4.6))
    types = sorted(set(pred.config_type))
    colours = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    for k, ct in enumerate(types):
        sel = [i for i, c in enumerate(pred.config_type) if c == ct]
        colour = colours(k % colours.N)
        ax_e.scatter([pred.e_ref[i] for i in sel], [pred.e_pred[i] for i in sel], s=18,
                     color=colour, label=ct)
        f_ref = np.concatenate([pred.f_ref[i] for i in sel])
        f_pred = np.concatenate([pred.f_pred[i] for i in sel])
        ax_f.scatter(f_ref, f_pred, s=5, color=colour, label=ct, alpha=0.7)
    for ax, label in ((ax_e, "energy (eV/atom)"), (ax_f, "force component (eV/Angstrom)")):
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"DFT {label}")
        ax.set_ylabel(f"predicted {label}")
    stats = pred.stats()
    ax_e.set_title(f"energy RMSE {stats.energy_rmse_mev:.2f} meV/atom")
    ax_f.set_title(f"force RMSE {stats.force_rmse_mev:.1f} meV/A")
    ax_e.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def learning_curve_plot(curve, path: Path, title: str) -> None:
    """Loss, and energy and force RMSE on the training and test sets, against iteration
    (the table of ``jobs.generation_learning_curve``); a note when there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_e, ax_f) = plt.subplots(1, 3, figsize=(13, 4.2))
    if curve is None or len(curve) == 0:
        ax_e.text(0.5, 0.5, "pacemaker wrote no metrics", ha="center", va="center", transform=ax_e.transAxes)
    else:
        it = curve["iteration"]
        ax_l.plot(it, curve["loss"], label="train")
        if "test_loss" in curve:
            sel = curve["test_loss"].notna()
            ax_l.plot(it[sel], curve["test_loss"][sel], "o-", ms=3, label="test")
        for ax, what, unit in ((ax_e, "energy", "meV/atom"), (ax_f, "force", "meV/A")):
            ax.plot(it, curve[f"train_{what}_rmse_mev"], label="train")
            column = f"test_{what}_rmse_mev"
            if column in curve:
                sel = curve[column].notna()
                ax.plot(it[sel], curve[column][sel], "o-", ms=3, label="test")
            ax.set_ylabel(f"{what} RMSE ({unit})")
        if "attempt" in curve and curve["attempt"].nunique() > 1:
            for start in curve.groupby("attempt")["iteration"].min().iloc[1:]:
                for ax in (ax_l, ax_e, ax_f):
                    ax.axvline(start, color="grey", lw=0.8, ls=":")
        ax_l.set_ylabel("loss")
        for ax in (ax_l, ax_e, ax_f):
            ax.set_yscale("log")
            ax.set_xlabel("iteration")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


# -- comparable generations ---------------------------------------------------------------
@dataclass
class CommonHoldoutRow:
    generation: int
    parent_generation: int | None
    structures: int
    energy_rmse_mev: float
    force_rmse_mev: float
    force_max_mev: float


@dataclass
class CommonHoldout:
    """What ``compare_on_common_holdout`` compared: the rows, each generation's errors on
    them, and the fixed holdout they came from ("" where none was named: then the
    intersection of the generations' holdouts) with its size."""

    ids: list[int]
    rows: list[CommonHoldoutRow]
    fixed: str = ""
    fixed_size: int = 0


def common_holdout(db: DatabaseManager, generations: list[int] | None = None) -> tuple[list[int], list[CommonHoldoutRow]]:
    """``compare_on_common_holdout``'s rows and errors."""
    compared = compare_on_common_holdout(db, generations)
    return compared.ids, compared.rows


def compare_on_common_holdout(db: DatabaseManager, generations: list[int] | None = None) -> CommonHoldout:
    """Every published generation (or ``generations``) evaluated on the same rows: the
    intersection of their holdouts (with the stable split, the first one's holdout), cut
    to the fixed holdout where the newest generation had one named (TrainConfig
    ``holdout``): rows a generation trained on are never compared.
    The deployed model (ACE + ZBL + reference energies) against the stored labels:
    energy RMSE in meV/atom, force RMSE and largest error per Cartesian component in meV/A."""
    from autopipec_hpc.dataset_prep import DatasetManifest

    records = [r for r in db.records() if r.status == RecordState.SUCCEEDED and r.potential_path is not None]
    if generations is not None:
        records = [r for r in records if r.generation in generations]
    manifests = [DatasetManifest.load(Path(r.potential_path)) for r in records]
    holdouts = [set(m.test_ids) for m in manifests]
    shared = sorted(set.intersection(*holdouts)) if holdouts else []
    newest = manifests[-1] if manifests else None
    if newest is not None and newest.holdout:
        shared = sorted(set(shared) & set(newest.holdout_ids))
    common, structures, labels = [], [], []
    for i in shared:
        try:
            row = db.get_row(i)
        except KeyError:  # deleted since: compared on the rows that are left, and said so
            log.warning("holdout row id=%s is no longer in %s; left out of the comparison", i, db.target)
            continue
        common.append(i)
        structures.append(row.toatoms(add_additional_information=False))
        labels.append((row.energy, row.forces))
    rows = []
    for r in records:
        calc = registry.load_calculator(Path(r.potential_path))
        de, df = [], []
        for atoms, (energy, forces) in zip(structures, labels):
            atoms = atoms.copy()
            atoms.calc = calc
            de.append((atoms.get_potential_energy() - energy) / len(atoms))
            df.append((atoms.get_forces() - forces).ravel())
        de_a = np.asarray(de)
        df_a = np.concatenate(df) if df else np.zeros(0)
        rows.append(CommonHoldoutRow(
            generation=r.generation, parent_generation=r.parent_generation, structures=len(common),
            energy_rmse_mev=1000 * float(np.sqrt(np.mean(de_a**2))) if len(de_a) else math.nan,
            force_rmse_mev=1000 * float(np.sqrt(np.mean(df_a**2))) if len(df_a) else math.nan,
            force_max_mev=1000 * float(np.abs(df_a).max()) if len(df_a) else math.nan,
        ))
    fixed = newest.holdout if newest is not None else ""
    return CommonHoldout(common, rows, fixed, len(newest.holdout_ids) if fixed else 0)
