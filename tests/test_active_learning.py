"""Active learning: candidates, selection by extrapolation grade, labelling, warm starts, the loop."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from autopipec_hpc.cli import main
from autopipec_hpc.db import DatabaseManager, StructureStatus


def _bytes(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _frames(n=3, seed=0, labelled=False):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.info.update(config_type="md_300K", temperature=300.0, md_step=10 * k, generator="lammps-md")
        if labelled:
            atoms.calc = EMT()
            atoms.get_potential_energy()
        out.append(atoms)
    return out


def test_import_candidate_accepts_unlabelled_frames_and_keeps_provenance(tmp_path):
    path = tmp_path / "md.extxyz"
    ase.io.write(path, _frames())
    db_path = tmp_path / "s.db"
    assert main(["import", str(path), "--db", str(db_path), "--status", "CANDIDATE"]) == 0
    db = DatabaseManager(db_path)
    rows = list(db.iter_rows(status=StructureStatus.CANDIDATE))
    assert len(rows) == 3
    assert [r.md_step for r in rows] == [0, 10, 20]
    assert all(r.config_type == "md_300K" and r.temperature == 300.0 and r.generator == "lammps-md" for r in rows)
    assert all(r.get("energy") is None for r in rows)


def test_unlabelled_frames_are_still_refused_for_any_other_status(tmp_path):
    path = tmp_path / "md.extxyz"
    ase.io.write(path, _frames())
    db_path = tmp_path / "s.db"
    DatabaseManager(db_path).add_candidate(_frames(1)[0], "md_300K")
    before = _bytes(db_path)
    assert main(["import", str(path), "--db", str(db_path)]) == 2
    assert _bytes(db_path) == before


def test_set_labels_keeps_unique_id_and_key_value_pairs(tmp_path):
    db = DatabaseManager(tmp_path / "s.db")
    row_id = db.add_candidate(_frames(1)[0], "md_300K", temperature=300.0)
    uid = db.get_row(row_id).unique_id
    db.set_labels(row_id, -1.5, np.ones((4, 3)), StructureStatus.TRAINING_READY, labelled_by="x:Y")
    row = db.get_row(row_id)
    assert row.unique_id == uid and row.id == row_id
    assert row.status == "TRAINING_READY" and row.temperature == 300.0 and row.config_type == "md_300K"
    assert row.energy == -1.5 and np.allclose(row.forces, 1.0)
