"""DatasetBuilder: delta targets, skips, weights, stratified split, file formats."""

from __future__ import annotations

import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from ase.build import bulk

from autopipec_hpc.dataset_files import read_pickle
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest, DatasetSettings
from autopipec_hpc.errors import ConfigError, InsufficientDataError
from autopipec_hpc.physics import ZBLCalculator
from autopipec_hpc.splits import fingerprint_draw, holdout_quota, split_by_draws
from tests.helpers import DATA, PACEMAKER, labelled


def golden_structure(mask=None) -> Atoms:
    atoms = Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]], cell=[10, 10, 10], pbc=True)
    forces = np.array([[0.1, 0, 0], [-0.1, 0, 0], [0, 0, 0]])
    s = labelled(atoms, -100.0, forces, db_id=1, config_type="golden")
    if mask is not None:
        s.arrays["force_mask"] = np.array(mask)
    return s


def build(structures, tmp_path: Path, **settings) -> DatasetManifest:
    return DatasetBuilder(DatasetSettings(**settings)).prepare_dataset(structures, tmp_path / "ds")


@pytest.mark.parametrize(
    "mask,golden", [(None, "golden_three_atoms.extxyz"), ([1, 0, 1], "golden_three_atoms_masked.extxyz")]
)
def test_extxyz_matches_hand_written_golden_file_byte_for_byte(tmp_path, mask, golden):
    # E_DFT -100 eV, three Cu atoms 2.5 A apart (beyond the ZBL outer cutoff), reference -30 eV/atom.
    m = build([golden_structure(mask)], tmp_path, reference_energies={"Cu": -30.0}, test_fraction=0.0)
    written = (Path(m.directory) / m.train_extxyz).read_bytes()
    assert written == (DATA / golden).read_bytes()


def test_delta_target_subtracts_zbl_and_reference_energies(tmp_path):
    # Short bonds so ZBL is large: E_DFT - E_ZBL - refs is what must be written.
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 1.2]])
    f_dft = np.array([[0, 0, -5.0], [0, 0, 5.0]])
    s = labelled(atoms, -100.0, f_dft, db_id=5)
    e_zbl, _, f_zbl, _ = ZBLCalculator(1.0, 2.0).evaluate(atoms)
    assert e_zbl > 40.0
    m = build([s], tmp_path, reference_energies={"Cu": -10.0}, test_fraction=0.0)
    df = read_pickle(m.train_paths[0])
    row = df.iloc[0]
    assert row["energy_corrected"] == pytest.approx(-100.0 - e_zbl + 20.0)
    assert row["energy"] == row["energy_corrected"]
    np.testing.assert_allclose(row["forces"], f_dft - f_zbl)
    assert row["energy_dft"] == -100.0 and row["energy_zbl"] == pytest.approx(e_zbl)
    assert row["db_id"] == 5 and row["config_type"] == "bulk"
    frame = ase.io.read(Path(m.directory) / m.train_extxyz)
    assert frame.get_potential_energy() == pytest.approx(-100.0 - e_zbl + 20.0)


def test_bad_structures_are_skipped_named_and_counted(tmp_path, cu_bulk, caplog):
    good = [labelled(cu_bulk, -100.0 - k, db_id=k) for k in range(4)]
    nan_energy = labelled(cu_bulk, float("nan"), db_id=10)
    inf_force = labelled(cu_bulk, -1.0, np.full((len(cu_bulk), 3), np.inf), db_id=11)
    wrong_shape = labelled(cu_bulk, -1.0, np.zeros((3, 3)), db_id=12)
    missing = cu_bulk.copy()
    missing.info.update(db_id=13, config_type="bulk")
    overlap = labelled(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 1e-4]]), -1.0, db_id=14)
    m = build(good + [nan_energy, inf_force, wrong_shape, missing, overlap], tmp_path)
    reasons = {s.db_id: s.reason for s in m.skipped}
    assert set(reasons) == {10, 11, 12, 13, 14}
    assert "nan" in reasons[10].lower()
    assert "inf" in reasons[11].lower()
    assert "shape" in reasons[12]
    assert "missing energy" in reasons[13]
    assert "apart" in reasons[14]
    assert sorted(m.train_ids + m.test_ids) == [0, 1, 2, 3]
    for db_id in reasons:
        assert f"id={db_id}" in caplog.text


def test_no_usable_structures_raises_before_any_file_is_written(tmp_path, cu_bulk):
    with pytest.raises(InsufficientDataError):
        build([], tmp_path)
    with pytest.raises(InsufficientDataError):
        build([labelled(cu_bulk, float("nan"), db_id=1)], tmp_path)
    assert not (tmp_path / "ds").exists()


def test_force_mask_becomes_per_atom_weights_with_energy_weights(tmp_path, cu_bulk):
    mask = np.zeros(len(cu_bulk), dtype=int)
    mask[:5] = 1
    masked = labelled(cu_bulk, -10.0, db_id=1)
    masked.arrays["force_mask"] = mask
    plain = labelled(cu_bulk, -11.0, db_id=2)
    m = build([masked, plain], tmp_path, test_fraction=0.0)
    df = read_pickle(m.train_paths[0]).set_index("db_id")
    np.testing.assert_array_equal(df.loc[1, "w_forces"], mask.astype(float))
    np.testing.assert_array_equal(df.loc[2, "w_forces"], np.ones(len(cu_bulk)))
    assert (df["w_energy"] == 1.0).all()
    assert m.has_force_weights


def test_no_weight_columns_without_masks(tmp_path, cu_bulk):
    m = build([labelled(cu_bulk, -10.0, db_id=1)], tmp_path, test_fraction=0.0)
    df = read_pickle(m.train_paths[0])
    assert "w_forces" not in df and "w_energy" not in df


def stratified_split(types: dict[int, str], fraction: float, seed: int):
    """``split_by_draws`` on ``{db_id: config_type}``, each id standing for one structure's content."""
    ids = np.array(list(types))
    names = sorted(set(types.values()))
    kinds = np.array([names.index(types[i]) for i in ids])
    draws = np.array([fingerprint_draw(Atoms("H", positions=[[0, 0, 1e-3 * i]]), seed) for i in ids])
    return split_by_draws(ids, kinds, names, draws, fraction)


def test_stratified_split_covers_every_config_type_and_is_deterministic():
    types = {i: f"t{i % 7}" for i in range(200)} | {1000: "lonely"}
    train, test, singles = stratified_split(types, 0.1, seed=3)
    again = stratified_split(dict(reversed(list(types.items()))), 0.1, seed=3)
    assert (train, test, singles) == again
    assert singles == ["lonely"] and 1000 in train
    assert set(train).isdisjoint(test) and len(train) + len(test) == 201
    for t in {f"t{k}" for k in range(7)}:
        members = {i for i, c in types.items() if c == t}
        assert len(members & set(test)) == holdout_quota(len(members), 0.1) == 3  # 28 or 29 rows
        assert members & set(train)
    other = stratified_split(types, 0.1, seed=4)
    assert other[1] != test


def test_two_structure_config_type_goes_to_both_sets():
    train, test, _ = stratified_split({1: "a", 2: "a"}, 0.1, seed=0)
    assert len(train) == 1 and len(test) == 1


def test_reference_energies_fitted_on_train_make_raw_totals_trainable(tmp_path):
    # All-electron totals: thousands of eV per atom.
    structures = []
    for k, a in enumerate(np.linspace(3.4, 3.9, 10)):
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        structures.append(labelled(atoms, -45_000.0 * 4 + 0.5 * (a - 3.6) ** 2, db_id=k))
    m = build(structures, tmp_path)
    assert m.reference_energies["Cu"] == pytest.approx(-45_000.0, abs=1.0)
    lo, hi = m.target_energy_per_atom_range
    assert -1.0 < lo < hi < 1.0
    assert m.reference_energies_source.startswith("least squares")


def test_missing_reference_energy_is_named(tmp_path, cu_bulk):
    with pytest.raises(ConfigError, match="Cu"):
        build([labelled(cu_bulk, -1.0, db_id=1)], tmp_path, reference_energies={"O": -1.0})


def test_shards_split_by_atom_count_and_keep_every_row(tmp_path, cu_bulk):
    structures = [labelled(cu_bulk, -float(k), db_id=k) for k in range(10)]  # 32 atoms each
    m = build(structures, tmp_path, shard_atoms=100, test_fraction=0.2)
    assert len(m.train_files) == 3  # 8 structures, 3 per shard
    rows = sum(len(read_pickle(p)) for p in m.train_paths)
    assert rows == len(m.train_ids) == 8


def test_manifest_round_trips(tmp_path, cu_bulk):
    m = build([labelled(cu_bulk, -float(k), db_id=k) for k in range(3)], tmp_path)
    again = DatasetManifest.load(m.directory)
    assert again == m


def test_failed_write_never_replaces_a_good_file(tmp_path, cu_bulk, monkeypatch):
    good = build([labelled(cu_bulk, -1.0, db_id=1)], tmp_path, test_fraction=0.0)
    before = {p.name: p.read_bytes() for p in Path(good.directory).iterdir()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_pickle", explode)
    with pytest.raises(OSError, match="disk full"):
        build([labelled(cu_bulk, -2.0, db_id=1)], tmp_path, test_fraction=0.0)
    after = {p.name: p.read_bytes() for p in Path(good.directory).iterdir()}
    assert after["train-000.pckl.gzip"] == before["train-000.pckl.gzip"]
    assert not [n for n in after if n.endswith(".tmp")]


MINIMAL_INPUT = """
seed: 1
potential:
  elements: [Cu]
  embeddings: {{ALL: {{npot: FinnisSinclairShiftedScaled, fs_parameters: [1, 1, 1, 0.5], ndensity: 2}}}}
  bonds: {{ALL: {{radbase: SBessel, radparameters: [5.25], rcut: 5.0, dcut: 0.01}}}}
  functions: {{number_of_functions_per_element: 5, ALL: {{nradmax_by_orders: [5, 2], lmax_by_orders: [0, 1]}}}}
data: {{filename: {train}, test_filename: {test}, reference_energy: 0}}
fit: {{loss: {{kappa: 0.5}}, maxiter: 1}}
backend: {{evaluator: pyace, parallel_mode: serial}}
"""


@pytest.mark.pacemaker
def test_pacemaker_dry_run_reads_the_pickle_and_keeps_the_energies(tmp_path):
    """Real `pacemaker --dry-run` loads our files and trains on exactly our targets."""
    pacemaker = PACEMAKER
    structures = []
    for k, a in enumerate(np.linspace(3.5, 3.8, 6)):
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
        atoms.rattle(0.02, seed=k)
        # Raw all-electron-like totals (-1640 eV/atom) would trip pacemaker's automatic
        # reference-energy switch if they reached it.
        structures.append(labelled(atoms, -1640.0 * 32 + k * 0.3, db_id=k, config_type="fcc"))
    m = build(structures, tmp_path, test_fraction=0.2)
    run = Path(m.directory)
    (run / "input.yaml").write_text(
        MINIMAL_INPUT.format(train=m.train_files, test=m.test_files)
    )
    done = subprocess.run([str(pacemaker), "input.yaml", "--dry-run"], cwd=run,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    seen = read_pickle(run / "fitting_data_info.pckl.gzip").set_index("db_id")
    ours = read_pickle(m.train_paths[0]).set_index("db_id")
    assert sorted(seen.index) == sorted(ours.index) == m.train_ids
    np.testing.assert_allclose(
        seen.loc[ours.index, "energy_corrected"], ours["energy_corrected"], rtol=0, atol=1e-12
    )
    assert np.abs(ours["energy_corrected"] / 32).max() < 1.0  # eV/atom, not -1640


def test_example_dataset_shows_a_non_zero_zbl_baseline(tmp_path):
    # The demo's showcase prints the baseline's range: frames with no pair inside the outer
    # cutoff made it read "0 .. 0 eV", hiding the feature the project is built around.
    from autopipec_hpc.example_data import example_structures

    structures = []
    for k, (atoms, ctype) in enumerate(example_structures()):
        atoms.info.update(db_id=k + 1, config_type=ctype)
        structures.append(atoms)
    m = build(structures, tmp_path)
    lo, hi = m.zbl_energy_range
    assert lo == 0.0 and hi > 0.1  # most cells have no close pair; the hot ones do
    assert m.min_distance < m.zbl_outer
    assert m.zbl_energy_per_atom_range[1] > 0.0
