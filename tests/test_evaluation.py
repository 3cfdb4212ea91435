"""Holdout evaluation without a fit: EMT stands in for ACE on a test set written by the dataset stage.

The "DFT" labels are the deployed model EMT + ZBL + reference energies plus a
known offset per structure (energy) and per component (forces), so the delta
targets are EMT plus the offsets and every error the evaluation reports can be
computed by hand from the offsets alone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from ase.calculators.emt import EMT
from ase.calculators.mixing import SumCalculator

from autopipec_hpc.dataset_files import read_pickle, write_pickle
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings
from autopipec_hpc.evaluation import (
    FORCE_ERROR_CONVENTION,
    evaluate,
    learning_curve_plot,
    pacemaker_prediction_stats,
    parity_plot,
)
from autopipec_hpc.example_data import example_structures
from autopipec_hpc.physics import ReferenceEnergyCalculator, ZBLCalculator
from tests.helpers import labelled

# Cu neighbours sit at 2.4-2.6 A: this outer cutoff makes the ZBL baseline non-zero.
ZBL = (1.5, 2.7)
REFERENCE = {"Cu": -0.3}  # eV per atom
MASKED_ID = 5  # this structure's first atom has its forces masked out


class Offsets:
    """The label offsets (DFT label - EMT) per db_id: energy in eV, forces in eV/A."""

    def __init__(self, seed: int = 11) -> None:
        self.rng = np.random.default_rng(seed)
        self.energy: dict[int, float] = {}
        self.forces: dict[int, np.ndarray] = {}

    def label(self, db_id: int, atoms, config_type: str):
        """Label ``atoms`` (which carry EMT results) as EMT + ZBL + references + offsets."""
        zbl = ZBLCalculator(*ZBL)
        e = atoms.calc.results["energy"] + zbl.get_potential_energy(atoms) + REFERENCE["Cu"] * len(atoms)
        f = atoms.calc.results["forces"] + zbl.get_forces(atoms)
        self.energy[db_id] = float(self.rng.normal(0.0, 0.05 * len(atoms)))
        self.forces[db_id] = self.rng.normal(0.0, 0.03, f.shape)
        out = labelled(atoms, e + self.energy[db_id], f + self.forces[db_id], db_id=db_id, config_type=config_type)
        if db_id == MASKED_ID:
            out.arrays["force_mask"] = np.array([0] + [1] * (len(atoms) - 1))
        return out


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    offsets = Offsets()
    structures = [offsets.label(k + 1, atoms, ctype) for k, (atoms, ctype) in enumerate(example_structures())]
    settings = DatasetSettings(test_fraction=0.5, seed=3, zbl_inner=ZBL[0], zbl_outer=ZBL[1],
                               reference_energies=REFERENCE, write_extxyz=False)
    manifest = DatasetBuilder(settings).prepare_dataset(structures, tmp_path_factory.mktemp("ds"))
    return manifest, offsets


def hand_errors(manifest, offsets) -> pd.DataFrame:
    """Per test structure: the prediction error EMT makes, from the offsets alone (meV units)."""
    rows = []
    for path in manifest.test_paths:
        for _, row in read_pickle(path).iterrows():
            db_id, n = int(row["db_id"]), len(row["ase_atoms"])
            keep = np.ones(n, bool) if row.get("w_forces") is None else np.asarray(row["w_forces"]) > 0
            rows.append({"config_type": row["config_type"], "natoms": n,
                         "de": -1000.0 * offsets.energy[db_id] / n,
                         "df": -1000.0 * offsets.forces[db_id][keep].ravel()})
    return pd.DataFrame(rows)


def expected(errors: pd.DataFrame) -> dict[str, float]:
    df = np.concatenate(list(errors["df"]))
    return {
        "structures": len(errors), "atoms": int(errors["natoms"].sum()),
        "energy_rmse_mev": math.sqrt(float(np.mean(errors["de"] ** 2))),
        "energy_mae_mev": float(np.mean(np.abs(errors["de"]))),
        "force_rmse_mev": math.sqrt(float(np.mean(df ** 2))),
        "force_mae_mev": float(np.mean(np.abs(df))),
    }


def assert_stats(stats, want: dict[str, float]) -> None:
    assert (stats.structures, stats.atoms) == (want["structures"], want["atoms"])
    for key in ("energy_rmse_mev", "energy_mae_mev", "force_rmse_mev", "force_mae_mev"):
        assert getattr(stats, key) == pytest.approx(want[key], rel=1e-9, abs=1e-9), key


def deployed(manifest) -> SumCalculator:
    return SumCalculator([EMT(), ZBLCalculator(*ZBL), ReferenceEnergyCalculator(manifest.reference_energies)])


def test_metrics_match_a_hand_computation_overall_and_per_config_type(holdout):
    manifest, offsets = holdout
    assert manifest.has_force_weights and MASKED_ID in manifest.test_ids + manifest.train_ids
    report, total = evaluate(manifest.test_paths, EMT(), deployed(manifest))
    errors = hand_errors(manifest, offsets)
    assert len(errors) == len(manifest.test_ids) > 4
    want = expected(errors)
    # ACE alone vs the delta targets, and ACE + ZBL + references vs DFT: both err by the offsets
    assert_stats(report.residual, want)
    assert_stats(report.total, want)
    assert_stats(total.stats(), want)
    assert set(report.total_by_config_type) == set(errors["config_type"]) == set(manifest.test_counts)
    for ctype, group in errors.groupby("config_type"):
        assert_stats(report.total_by_config_type[ctype], expected(group))
        assert_stats(report.residual_by_config_type[ctype], expected(group))


def test_a_deployment_without_the_baseline_shows_in_the_total_only(holdout):
    manifest, _ = holdout
    report, _ = evaluate(manifest.test_paths, EMT(), EMT())  # no ZBL, no reference energies
    good, _ = evaluate(manifest.test_paths, EMT(), deployed(manifest))
    assert report.residual == good.residual
    assert report.total.energy_rmse_mev > 3 * good.total.energy_rmse_mev
    assert report.total.force_rmse_mev > 10 * good.total.force_rmse_mev


def test_report_is_saved_with_units_and_extra_values(holdout, tmp_path):
    manifest, _ = holdout
    report, _ = evaluate(manifest.test_paths, EMT(), deployed(manifest))
    report.save(tmp_path / "metrics.json", {"generation": 7})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["generation"] == 7 and saved["units"]["force"].endswith(FORCE_ERROR_CONVENTION)
    assert saved["total"]["energy_rmse_mev"] == pytest.approx(report.total.energy_rmse_mev)
    assert set(saved["residual_by_config_type"]) == set(report.residual_by_config_type)


def test_pacemakers_own_predictions_are_read_like_ours(tmp_path):
    assert pacemaker_prediction_stats(tmp_path / "absent.pckl.gzip") is None
    forces = [np.zeros((2, 3)), np.ones((1, 3))]
    table = pd.DataFrame({
        "config_type": ["a", "b"],
        "energy_corrected": [1.0, 2.0], "energy_pred": [1.2, 1.9],  # per structure, eV
        "forces": forces, "forces_pred": [f + 0.01 for f in forces],
    })
    write_pickle(table, tmp_path / "pred.pckl.gzip")
    stats = pacemaker_prediction_stats(tmp_path / "pred.pckl.gzip")
    de = np.array([0.2 / 2, -0.1 / 1]) * 1000.0
    assert (stats.structures, stats.atoms) == (2, 3)
    assert stats.energy_rmse_mev == pytest.approx(math.sqrt(np.mean(de ** 2)))
    assert stats.energy_mae_mev == pytest.approx(np.mean(np.abs(de)))
    assert stats.force_rmse_mev == pytest.approx(10.0) and stats.force_mae_mev == pytest.approx(10.0)


PNG = b"\x89PNG\r\n\x1a\n"


def test_parity_plot_is_written(holdout, tmp_path):
    manifest, _ = holdout
    _, total = evaluate(manifest.test_paths, EMT(), deployed(manifest))
    parity_plot(total, tmp_path / "parity.png", "holdout")
    assert (tmp_path / "parity.png").read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["parity.png"]  # no temporary file left


def test_learning_curve_plot_across_attempts_and_without_metrics(tmp_path):
    iterations = np.arange(1, 21)
    curve = pd.DataFrame({
        "iteration": iterations, "attempt": [1] * 10 + [2] * 10,
        "loss": 1.0 / iterations,
        "train_energy_rmse_mev": 100.0 / iterations, "train_force_rmse_mev": 300.0 / iterations,
        "test_loss": np.where(iterations % 5 == 0, 1.5 / iterations, np.nan),
        "test_energy_rmse_mev": np.where(iterations % 5 == 0, 120.0 / iterations, np.nan),
        "test_force_rmse_mev": np.where(iterations % 5 == 0, 350.0 / iterations, np.nan),
    })
    learning_curve_plot(curve, tmp_path / "curve.png", "two attempts")
    learning_curve_plot(None, tmp_path / "none.png", "no metrics")
    for name in ("curve.png", "none.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
