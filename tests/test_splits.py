"""The train/test split: content-keyed, quota per config type, sides kept across generations."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from ase import Atoms

from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest, DatasetSettings
from autopipec_hpc.splits import fingerprint_draw, holdout_quota, split_by_draws
from tests.helpers import labelled

from autopipec_hpc.store import DatabaseManager


def dimer(k: int, config_type: str = "bulk", **info) -> Atoms:
    """A labelled Cu dimer whose content is fixed by ``k`` alone; db id ``k``."""
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.2 + 0.01 * k, 0.003 * k, 0]], cell=[9, 9, 9], pbc=True)
    s = labelled(atoms, -1.0 - 0.001 * k, db_id=k, config_type=config_type)
    s.info.update(info)
    return s


def build(structures, tmp_path, name="ds", **settings) -> DatasetManifest:
    settings = {"seed": 42, "write_extxyz": False} | settings
    return DatasetBuilder(DatasetSettings(**settings)).prepare_dataset(structures, tmp_path / name)


def with_sides(structures, manifest: DatasetManifest) -> list[Atoms]:
    """What the next generation reads: each row used by ``manifest`` carries its side."""
    sides = {i: "train" for i in manifest.train_ids} | {i: "test" for i in manifest.test_ids}
    for s in structures:
        if s.info["db_id"] in sides:
            s.info["split"] = sides[s.info["db_id"]]
    return structures


# -- the same file in two databases --------------------------------------------------------
def prepared_db(tmp_path, name: str, path, seed: int, extra: int = 0) -> tuple[set, DatasetManifest]:
    db = DatabaseManager(str(tmp_path / f"{name}.db"))
    for k in range(extra):  # rows written first shift every id the file gets
        e = dimer(k)
        db.add_structure(e, e.get_potential_energy(), e.get_forces(), "extra")
    db.import_files([path])
    manifest = DatasetBuilder(DatasetSettings(seed=seed)).prepare_dataset(db.ready_structures(), tmp_path / name)
    keys = set()
    for i in manifest.test_ids:
        row = db.get_row(i)
        if row.get("source") is not None:
            keys.add((row.get("source"), int(row.get("frame"))))
    return keys, manifest


def test_same_file_and_seed_give_the_same_test_set_in_two_databases(tmp_path, cu_dft_path):
    a, _ = prepared_db(tmp_path, "a", cu_dft_path, seed=42)
    b, _ = prepared_db(tmp_path, "b", cu_dft_path, seed=42, extra=3)  # other ids, other unique_ids
    assert a == b and len(a) >= 9
    other, _ = prepared_db(tmp_path, "c", cu_dft_path, seed=7)
    assert other != a


def test_every_config_type_of_the_real_data_gets_its_quota(tmp_path, cu_dft_path):
    import ase.io

    sizes = Counter(str(s.info.get("config_type", "default")) for s in ase.io.read(str(cu_dft_path), ":"))
    _, m = prepared_db(tmp_path, "a", cu_dft_path, seed=42)
    for ctype, n in sizes.items():
        got = m.test_counts.get(ctype, 0)
        assert got == holdout_quota(n, 0.1), ctype
        if n >= 2:
            assert abs(got - 0.1 * n) <= 1 and m.train_counts[ctype] >= 1
    assert m.single_structure_types == sorted(c for c, n in sizes.items() if n == 1)


# -- the quota rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_quota_is_within_one_of_the_fraction_for_every_size(fraction):
    sizes = list(range(1, 61))
    names = [f"t{n:02d}" for n in sizes]
    kinds = np.repeat(np.arange(len(sizes)), sizes)
    ids = np.arange(len(kinds)) + 1
    draws = np.random.default_rng(1).random(len(kinds))
    train, test, singles = split_by_draws(ids, kinds, names, draws, fraction)
    assert sorted(train + test) == ids.tolist()
    counts = np.bincount(kinds[np.asarray(test) - 1], minlength=len(sizes))
    for n, got in zip(sizes, counts):
        assert got == holdout_quota(n, fraction)
        if n >= 2:
            assert 1 <= got <= n - 1 and abs(got - fraction * n) <= 1
    assert singles == ["t01"]
    assert split_by_draws(ids, kinds, names, draws, 0.0)[1] == []


def test_lowest_draws_go_to_test_and_ties_fall_to_the_lower_id():
    ids = np.array([5, 3, 9, 1, 7, 2, 8, 4, 6, 10])
    draws = np.array([0.9, 0.1, 0.5, 0.1, 0.3, 0.8, 0.7, 0.6, 0.4, 0.2])
    _, test, _ = split_by_draws(ids, np.zeros(10, int), ["a"], draws, 0.3)
    assert test == [1, 3, 10]  # 1 and 3 tie at 0.1; 10 has 0.2


# -- kept sides ---------------------------------------------------------------------------
def test_kept_sides_stay_selected_rows_train_and_free_rows_fill_what_is_left(tmp_path):
    a = ([dimer(k, "a", split="test") for k in (1, 2)] + [dimer(k, "a", split="train") for k in range(3, 11)]
         + [dimer(k, "a", selected_by_generation=1) for k in (11, 12)] + [dimer(k, "a") for k in range(13, 31)])
    a[1].info["selected_by_generation"] = 1  # a kept side wins over the selection
    b = [dimer(k, "b", split="test") for k in range(31, 34)] + [dimer(k, "b") for k in range(34, 41)]
    c = [dimer(k, "c", selected_by_generation=2) for k in range(41, 46)]
    single = [dimer(46, "single")]
    m = build(a + b + c + single, tmp_path)
    test = set(m.test_ids)
    free_a = sorted(range(13, 31), key=lambda k: fingerprint_draw(dimer(k), 42))
    # a: quota 3 of 30, two kept, so one free row: the lowest draw
    assert test & set(range(1, 31)) == {1, 2, free_a[0]}
    assert {3, 4, 5, 6, 7, 8, 9, 10, 11, 12} <= set(m.train_ids)
    # b: three kept test rows, over its quota of 1: none moves, no free row joins them
    assert test & set(range(31, 41)) == {31, 32, 33}
    # c: every row was chosen by active learning, so none is left to test on
    assert not test & set(range(41, 46)) and m.test_counts.get("c", 0) == 0
    assert 46 in m.train_ids and m.single_structure_types == ["single"]


def test_rows_never_change_side_as_generations_add_rows(tmp_path):
    types = ("bulk", "surface", "md")
    gen1 = [dimer(k, types[k % 3]) for k in range(1, 41)]
    m1 = build(gen1, tmp_path, "g1")
    gen2 = with_sides([dimer(k, types[k % 3]) for k in range(1, 41)], m1)
    gen2 += [dimer(k, (*types, "vacancy")[k % 4]) for k in range(41, 101)]
    for s in gen2[40:50]:
        s.info["selected_by_generation"] = 1
    m2 = build(gen2, tmp_path, "g2")
    assert set(m1.test_ids) <= set(m2.test_ids) and set(m1.train_ids) <= set(m2.train_ids)
    assert set(range(41, 51)) <= set(m2.train_ids)
    sizes = Counter(s.info["config_type"] for s in gen2)
    assert m2.test_counts == {t: holdout_quota(n, 0.1) for t, n in sizes.items()}
    m3 = build(with_sides(gen2, m2), tmp_path, "g3")
    assert (m3.train_ids, m3.test_ids) == (m2.train_ids, m2.test_ids)


# -- keyed on content -------------------------------------------------------------------------
def test_order_ids_and_unique_ids_do_not_move_a_structure(tmp_path):
    types = ("bulk", "surface", "md")
    structures = [dimer(k, types[k % 3], unique_id=f"{k:032x}") for k in range(1, 61)]
    m = build(structures, tmp_path, "a")
    shuffled = structures[:]
    random.Random(3).shuffle(shuffled)
    assert (build(shuffled, tmp_path, "b").test_ids) == m.test_ids
    # the same content under other ids and other unique ids (another database)
    moved = [dimer(k, types[k % 3], unique_id=f"{k + 7:032x}") for k in range(1, 61)]
    for s in moved:
        s.info["db_id"] = 1000 - s.info["db_id"]
    assert sorted(1000 - i for i in build(moved, tmp_path, "c").test_ids) == m.test_ids
    assert build(structures, tmp_path, "d", seed=43).test_ids != m.test_ids


def test_duplicate_structures_split_by_id(tmp_path):
    copies = [dimer(5, "dup") for _ in range(10)]
    for k, s in enumerate(copies):
        s.info["db_id"] = 100 + k
    m = build(copies[::-1], tmp_path)
    assert m.test_ids == [100]


def test_fingerprint_follows_content_not_float_noise():
    atoms = dimer(3)
    draw = fingerprint_draw(atoms, 42)
    assert 0.0 <= draw < 1.0
    noisy = atoms.copy()
    noisy.positions += 1e-9
    assert fingerprint_draw(noisy, 42) == draw
    assert fingerprint_draw(atoms, 43) != draw
    changes = [lambda a: a.positions.__setitem__((1, 0), a.positions[1, 0] + 1e-4),
               lambda a: a.set_atomic_numbers([29, 28]),
               lambda a: a.set_cell([9, 9, 9.001]),
               lambda a: a.set_pbc([True, True, False])]
    for change in changes:
        other = atoms.copy()
        change(other)
        assert fingerprint_draw(other, 42) != draw



# -- a fixed holdout ---------------------------------------------------------------------------

def test_fixed_holdout_rows_are_test_whatever_settled_them_and_the_rest_keeps_its_quota():
    ids = np.arange(1, 41)
    kinds = np.array([0] * 30 + [1] * 10)  # 30 "bulk", 10 "surface"
    draws = np.random.default_rng(3).random(40)
    kept = np.zeros(40, dtype=np.int8)
    kept[:3] = 1  # trained on by an earlier generation (persisted "train", or selected)
    fixed = np.zeros(40, dtype=bool)
    fixed[:3] = True  # ... but now named in the fixed holdout
    fixed[30:] = True  # and every "surface" row
    train, test, singles = split_by_draws(ids, kinds, ["bulk", "surface"], draws, 0.1, kept, fixed)
    assert set(ids[fixed]) <= set(test) and not set(ids[fixed]) & set(train)
    # the 27 bulk rows outside the holdout still give round(0.1 * 27) = 3 to test
    assert len(set(test) - set(ids[fixed])) == holdout_quota(27, 0.1) == 3
    assert sorted(train + test) == ids.tolist() and singles == []
    # with test_fraction 0 the test set is exactly the fixed holdout
    train0, test0, _ = split_by_draws(ids, kinds, ["bulk", "surface"], draws, 0.0, kept, fixed)
    assert test0 == sorted(ids[fixed].tolist()) and len(train0) == 27


def test_fixed_holdout_by_config_type_and_by_file_in_every_generation(tmp_path):
    import ase.io

    from autopipec_hpc.splits import FixedHoldout

    structures = [dimer(k, "bulk") for k in range(1, 21)] + [dimer(k, "rare") for k in range(21, 24)]
    file = tmp_path / "holdout.extxyz"
    ase.io.write(file, [structures[k] for k in (4, 9)], format="extxyz")  # two bulk rows, by content
    holdout = FixedHoldout(config_type="rare", file=file)
    first = build(structures, tmp_path, "g1", holdout=holdout)
    expected = [5, 10, 21, 22, 23]
    assert first.holdout_ids == expected and set(expected) <= set(first.test_ids)
    assert first.holdout == f"config_type rare; file {file}"
    # the next generation, with rows added and the sides of the first persisted, and a row
    # active learning chose in "rare": the holdout is still test, all of it
    more = with_sides(structures, first) + [dimer(k, "bulk") for k in range(24, 40)] + [dimer(40, "rare",
                                                                                        selected_by_generation=1)]
    second = build(more, tmp_path, "g2", holdout=holdout)
    assert second.holdout_ids == expected + [40] and set(second.holdout_ids) <= set(second.test_ids)
    assert not set(second.holdout_ids) & set(second.train_ids)
    assert DatasetManifest.load(tmp_path / "g2").holdout_ids == second.holdout_ids


@pytest.mark.parametrize("holdout, culprit", [
    ({"config_type": "surfac"}, "config_type 'surfac' has no labelled structure (config types: bulk)"),
    ({"file": "missing.extxyz"}, "holdout file missing.extxyz: no such file"),
    ({"file": "garbage.extxyz"}, "holdout file garbage.extxyz: not a readable Extended XYZ file"),
    ({"file": "elsewhere.extxyz"}, "1 of its 1 structures (frames 0) match no labelled structure"),
])
def test_a_fixed_holdout_named_wrong_is_refused_by_name(tmp_path, monkeypatch, holdout, culprit):
    import ase.io

    from autopipec_hpc.errors import ConfigError
    from autopipec_hpc.splits import FixedHoldout

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.extxyz").write_text("3\nnot a comment line of extxyz\nCu 0 0\n")
    ase.io.write(tmp_path / "elsewhere.extxyz", dimer(99), format="extxyz")
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        build([dimer(k) for k in range(1, 6)], tmp_path, holdout=FixedHoldout(**holdout))
    assert not (tmp_path / "ds").exists()
