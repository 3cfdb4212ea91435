"""DatabaseManager: a real ASE database, all-or-nothing import, streamed selection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.states import RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import DatabaseError, ImportDataError


def test_import_keeps_config_types_and_is_browsable_with_ase(tmp_path, cu_dft_path):
    path = tmp_path / "cu.db"
    db = DatabaseManager(path)
    assert db.import_files([cu_dft_path]) == 105
    plain = ase.db.connect(path)  # what `ase db` opens
    assert plain.count(status="TRAINING_READY") == 105
    frames = ase.io.read(cu_dft_path, ":")
    row = plain.get(id=7)
    assert row.config_type == frames[6].info["config_type"]
    assert row.energy == pytest.approx(frames[6].get_potential_energy())
    np.testing.assert_allclose(row.forces, frames[6].get_forces())


def test_frame_without_forces_is_refused_by_index_and_nothing_is_imported(tmp_path):
    good = bulk("Cu", "fcc", a=3.6, cubic=True)
    good.calc = SinglePointCalculator(good, energy=-1.0, forces=np.zeros((4, 3)))
    bad = bulk("Cu", "fcc", a=3.7, cubic=True)
    bad.calc = SinglePointCalculator(bad, energy=-1.0)
    src = tmp_path / "mixed.extxyz"
    ase.io.write(src, [good, good, bad, good])
    db = DatabaseManager(tmp_path / "x.db")
    with pytest.raises(ImportDataError, match=r"frame 2 has no forces"):
        db.import_files([src])
    assert db.count() == 0


def test_frame_without_energy_is_refused(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.arrays["forces"] = np.zeros((4, 3))
    src = tmp_path / "noenergy.xyz"
    ase.io.write(src, atoms, format="extxyz")
    with pytest.raises(ImportDataError, match=r"frame 0 has no energy"):
        DatabaseManager(tmp_path / "x.db").import_files([src])


def test_a_refused_second_file_leaves_the_first_file_unimported_too(tmp_path):
    good = bulk("Cu", "fcc", a=3.6, cubic=True)
    good.calc = SinglePointCalculator(good, energy=-1.0, forces=np.zeros((4, 3)))
    ok = tmp_path / "ok.extxyz"
    ase.io.write(ok, [good] * 3)
    bad = tmp_path / "bad.xyz"
    ase.io.write(bad, bulk("Cu"), format="extxyz")
    db = DatabaseManager(tmp_path / "x.db")
    with pytest.raises(ImportDataError, match="bad.xyz: frame 0"):
        db.import_files([ok, bad])
    assert db.count() == 0


def test_ready_structures_stream_and_reiterate(tmp_path):
    db = DatabaseManager(tmp_path / "x.db")
    for k in range(5):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.01 * k, cubic=True)
        db.add_structure(atoms, -1.0 * k, np.zeros((4, 3)), config_type=f"t{k % 2}")
    db.add_structure(bulk("Cu", cubic=True), 0.0, np.zeros((4, 3)), "t0", status="NEW")
    view = db.ready_structures()
    it = iter(view)
    first = next(it)  # a generator: rows come one at a time
    assert first.info["db_id"] == 1 and first.info["config_type"] == "t0"
    assert len(list(view)) == 5 == len(view)
    assert [a.info["db_id"] for a in view] == [1, 2, 3, 4, 5]


def test_training_records_are_rows_ase_can_select(tmp_path):
    db = DatabaseManager(tmp_path / "x.db")
    db.write_record(1, "RUNNING", values={"rmse_energy_mev": float("nan")})
    db.write_record(1, "SUCCEEDED", values={"rmse_energy_mev": 3.5}, data={"config": {"cutoff": 5.0}})
    rec = db.get_record(1)
    assert rec.status == "SUCCEEDED" and rec.values["rmse_energy_mev"] == 3.5
    assert rec.data["config"]["cutoff"] == 5.0
    assert db.next_generation() == 2
    assert ase.db.connect(tmp_path / "x.db").count(record="training") == 1


def test_unknown_path_kind_is_refused(tmp_path):
    with pytest.raises(DatabaseError, match="expected a .db"):
        DatabaseManager(tmp_path / "x.txt")


def test_records_are_typed_and_rows_keep_plain_strings(tmp_path):
    db = DatabaseManager(tmp_path / "x.db")
    db.write_record(2, RecordState.SUBMITTED, values={"run_dir": str(tmp_path / "gen-0002"), "train_job": "4711"})
    db.write_record(2, "SUCCEEDED", values={"potential_path": str(tmp_path / "p" / "2"), "iterations": 20,
                                            "test_energy_rmse_mev": 1.5, "wall_time_s": 3})
    rec = db.get_record(2)
    assert rec.status is RecordState.SUCCEEDED and rec.status == "SUCCEEDED" and rec.status.is_final
    assert rec.run_dir == tmp_path / "gen-0002" and rec.potential_path == tmp_path / "p" / "2"
    assert rec.train_job == "4711" and rec.evaluate_job is None
    assert rec.iterations == 20 and rec.test_energy_rmse_mev == 1.5 and rec.wall_time_s == 3.0
    assert rec.test_force_rmse_mev is None and rec.log_tail == "" and rec.metrics is None
    assert rec.values["iterations"] == 20 and rec.values["train_job"] == 4711  # every stored value, as stored
    row = ase.db.connect(tmp_path / "x.db").get(record="training")
    assert type(row.status) is str and row.status == "SUCCEEDED"
    with pytest.raises(DatabaseError, match="unknown training status 'DONE'"):
        db.write_record(2, "DONE")


def test_structure_status_is_stored_as_its_plain_string(tmp_path):
    db = DatabaseManager(tmp_path / "x.db")
    db.add_structure(bulk("Cu", cubic=True), 0.0, np.zeros((4, 3)), "t0")
    row = ase.db.connect(tmp_path / "x.db").get(id=1)
    assert type(row.status) is str and row.status == StructureStatus.TRAINING_READY == "TRAINING_READY"
    assert db.count(status=StructureStatus.TRAINING_READY) == 1 == len(db.ready_structures())


def test_updating_many_rows_indexes_ases_key_tables_by_row_id(tmp_path):
    """ase.db deletes a row's key-value entries by id before rewriting them, with no index
    on id: every update scanned the whole table (7,000 gamma writes: 45 s, squared in the
    size). update_rows indexes the tables once; ase reads and writes the file as before."""
    import sqlite3

    from autopipec_hpc.store.sqlite_rows import ID_INDEXES

    path = tmp_path / "c.db"
    db = DatabaseManager(path)
    ids = [db.add_candidate(bulk("Cu", "fcc", a=3.6 + 0.01 * k), "c") for k in range(5)]

    def indexes() -> set[str]:
        with sqlite3.connect(path) as con:
            return {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}

    assert not set(ID_INDEXES) & indexes()
    db.update_rows([(i, {"gamma_max": float(k)}) for k, i in enumerate(ids)])
    assert set(ID_INDEXES) <= indexes()
    plain = ase.db.connect(path)
    assert [plain.get(id=i).gamma_max for i in ids] == [0.0, 1.0, 2.0, 3.0, 4.0]
    plain.update(ids[0], gamma_max=9.0)  # ase itself still writes the file
    assert DatabaseManager(path).get_row(ids[0]).gamma_max == 9.0


def test_update_rows_leaves_each_row_as_ases_own_update_would(tmp_path):
    """update_rows writes SQLite rows in a few statements (update_key_values), not through
    ase.db's update (which decodes and rewrites each whole row). The two files must read
    back alike through ase.db, key by key, and answer the same queries."""
    import shutil

    path = tmp_path / "ours.db"
    db = DatabaseManager(path)
    ids = [db.add_candidate(bulk("Cu", "fcc", a=3.6 + 0.01 * k), f"c{k % 2}") for k in range(6)]
    shutil.copy(path, tmp_path / "ase.db")
    updates = [(i, {"gamma_max": 0.5 * k, "gamma_mean": 0.25, "scored_by_generation": 1,
                    "status": "DFT_REQUESTED" if k % 3 == 0 else "CANDIDATE"}) for k, i in enumerate(ids)]
    updates.append((ids[1], {"gamma_max": 7.0}))  # a second update of the same row: the last wins
    later = [(ids[2], {"status": 3.0}), (ids[3], {"note": "kept"}),  # a key changing kind, a new text key
             (ids[4], {"gamma_max": 11.0}), (ids[5], {"status": "LABELLED"})]  # kept kinds, new values
    db.update_rows(updates)
    db.update_rows(later)
    theirs = ase.db.connect(tmp_path / "ase.db")
    with theirs:
        for row_id, values in updates + later:
            theirs.update(row_id, **values)
    ours = ase.db.connect(path)
    for i in ids:
        a, b = ours.get(id=i), theirs.get(id=i)
        assert a.key_value_pairs == b.key_value_pairs and a.data == b.data
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.unique_id == b.unique_id and a.ctime == b.ctime
    for query in ("gamma_max>1", "status=DFT_REQUESTED", "scored_by_generation=1,config_type=c0", "gamma_mean",
                  "status>2", "status=CANDIDATE", "note=kept", "note"):
        assert [r.id for r in ours.select(query)] == [r.id for r in theirs.select(query)], query
    assert ours.get(id=ids[1]).gamma_max == 7.0

    def key_tables(file: Path) -> dict[str, list]:
        with sqlite3.connect(file) as con:
            return {table: sorted(con.execute(f"SELECT * FROM {table}").fetchall())
                    for table in ("keys", "text_key_values", "number_key_values")}

    assert key_tables(path) == key_tables(tmp_path / "ase.db")  # entry for entry
    with pytest.raises(KeyError):  # as ase.db's update of a missing row
        db.update_rows([(ids[0], {"gamma_max": 5.0}), (999, {"gamma_max": 1.0})])
    assert ours.get(id=ids[0]).gamma_max == 0.0  # the failed call changed nothing


def test_update_rows_refuses_what_ases_check_refuses_on_any_row(tmp_path):
    """Keys are checked by ase's rule once each (values are cleaned before, _clean_value): a
    bad key is refused on whichever row it comes, after rows whose keys passed, and the call
    writes nothing."""
    db = DatabaseManager(tmp_path / "s.db")
    ids = [db.add_candidate(bulk("Cu", "fcc", a=3.6 + 0.01 * k), "c") for k in range(3)]
    good = [(i, {"gamma_max": 1.0, "note": "ok"}) for i in ids[:2]]
    for bad in ({"id": 3.0}, {"bad key": 1.0}, {"gamma_max": 2.0, "energy": 1.0}):
        with pytest.raises(ValueError, match="Bad key"):
            db.update_rows(good + [(ids[2], bad)])
        assert all(db.get_row(i).get("gamma_max") is None for i in ids)


def test_iter_structure_rows_reads_the_rows_as_ase_db_reads_them(database):
    """iter_structure_rows reads SQLite rows from ase's schema directly (sqlite_rows; on PostgreSQL,
    through ase.db): the same ids, structures and exact labels as ase.db's own rows, page by
    page, other statuses left out."""
    from ase import Atoms

    from autopipec_hpc.store.structures import label_of

    db = DatabaseManager(database)
    rng = np.random.default_rng(3)
    skewed = bulk("Cu", "fcc", a=3.6, cubic=True)
    skewed.set_cell(skewed.cell.array + rng.normal(0, 0.2, (3, 3)), scale_atoms=True)
    skewed.rattle(0.1, seed=1)
    structures = [
        (bulk("Cu", "fcc", a=3.6), "bulk"),
        (skewed, "1"),  # a number-like label: quoted in its key, exact in the row's data
        (Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.4]]), "dimer"),  # no cell, no pbc
        (Atoms("Cu3", positions=rng.normal(0, 2, (3, 3)), cell=[8, 8, 12], pbc=[True, True, False]), "True"),
    ]
    ids = [db.add_candidate(atoms, label) for atoms, label in structures]
    db.update_rows([(ids[2], {"status": StructureStatus.DFT_REQUESTED.value})])
    plain = ase.db.connect(database)
    expected = [plain.get(id=i) for i in ids if i != ids[2]]
    got = list(db.iter_structure_rows(StructureStatus.CANDIDATE, page=2))
    assert [r.id for r in got] == [r.id for r in expected]
    for mine, theirs in zip(got, expected):
        atoms = theirs.toatoms()
        np.testing.assert_array_equal(mine.atoms.numbers, atoms.numbers)
        np.testing.assert_array_equal(mine.atoms.positions, atoms.positions)
        np.testing.assert_array_equal(mine.atoms.cell.array, atoms.cell.array)
        np.testing.assert_array_equal(mine.atoms.pbc, atoms.pbc)
        assert mine.label == label_of(theirs)
    assert [r.label for r in got] == ["bulk", "1", "True"]
    assert list(db.iter_structure_rows(StructureStatus.LABEL_FAILED)) == []


def test_iter_structure_rows_reads_a_row_without_pbc_as_ase_db_does(tmp_path):
    """A row whose pbc column is NULL (older writers) is read as ase.db reads it: not periodic."""
    import sqlite3

    path = tmp_path / "s.db"
    db = DatabaseManager(path)
    row_id = db.add_candidate(bulk("Cu", "fcc", a=3.6), "bulk")
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE systems SET pbc = NULL WHERE id = ?", (row_id,))
    (mine,) = db.iter_structure_rows(StructureStatus.CANDIDATE)
    assert mine.atoms.pbc.tolist() == ase.db.connect(path).get(id=row_id).toatoms().pbc.tolist() == [False] * 3
