"""ase.db's SQLite rows read and written in bulk, where ase.db's row-by-row way is the
cost: scoring thousands of candidates reads each one's structure and writes its gamma.
Both follow ase's own schema (``ase/db/sqlite.py``) and are tested against ase.db itself;
anything else (PostgreSQL, an old schema) goes through ase.db as before.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

log = logging.getLogger(__name__)

# The schema versions whose blobs and columns are read here (ase 3.22 to 3.29 write 9).
SCHEMA_VERSIONS = (9,)
PBC_BITS = np.array([1, 2, 4])


def config_label(key_value_pairs: dict[str, Any], data: dict[str, Any] | None) -> str:
    """A structure row's exact config_type label: its data's where the key-value pair holds a
    quoted spelling (``structures.label_key``), else the key-value pair ("default" if none)."""
    exact = data.get("config_type") if data else None
    return str(exact) if exact is not None else str(key_value_pairs.get("config_type", "default"))


@dataclass
class StructureRow:
    """What scoring needs of a row: its id, its structure, and its config_type label."""

    id: int
    atoms: Atoms
    label: str


def structure_rows(db: Any, status: str, after: int, page: int) -> list[StructureRow] | None:
    """The next ``page`` rows with ``status`` after row id ``after``, in id order, read on
    ``db.connection`` (an open ase.db SQLite transaction); None where the file's schema is
    not one read here (the caller goes through ase.db). ase.db builds a whole row of each
    (every column decoded, 51 us) and then its Atoms: 0.54 s of 7,000 candidates against 0.12."""
    with db.managed_connection() as connection:  # reads the file's schema version first
        if getattr(db, "version", None) not in SCHEMA_VERSIONS:
            return None
        query = ("SELECT id, numbers, positions, cell, pbc, key_value_pairs, data FROM systems WHERE id > ? AND id IN "
                 "(SELECT id FROM text_key_values WHERE key = 'status' AND value = ?) ORDER BY id LIMIT ?")
        found = connection.execute(query, (after, status, page)).fetchall()
    rows = []
    for row_id, species, positions, cell, pbc, text, data in found:
        atoms = Atoms(numbers=db.deblob(species, np.int32), positions=db.deblob(positions, shape=(-1, 3)),
                      cell=db.deblob(cell, shape=(3, 3)), pbc=(int(pbc or 0) & PBC_BITS).astype(bool))
        decoded = db.decode(data) if data is not None else None
        rows.append(StructureRow(row_id, atoms, config_label(key_values(db, text), decoded)))
    return rows


def key_values(db: Any, text: str) -> dict[str, Any]:
    """A row's ``key_value_pairs`` column as ase.db reads it. They are a flat JSON object of
    identifiers to numbers, bools and strings (``ase.db.core.check``), which ``json.loads``
    reads alike without ase's walk over every key and value for int keys and arrays
    (``jsonio.decode``): 0.35 s of a select of 7,000 candidates."""
    return json.loads(text) if isinstance(text, str) else db.decode(text)


# ase.db's SQLite schema indexes its key-value tables by key only, and every update of a
# row deletes that row's entries first (``DELETE ... WHERE id in (...)``): a scan of the
# whole table, so writing gamma on 7,000 candidates took 45 s, growing with the database
# squared. An index on ``id`` makes each update independent of the size; ase ignores it.
ID_INDEXES = {f"autopipec_{table}_id": table for table in ("keys", "text_key_values", "number_key_values", "species")}


def index_row_ids(path: Path) -> None:
    """Add the indexes of ``ID_INDEXES`` to an ASE SQLite file that lacks them. Only an
    optimisation: a read-only file, a busy writer or an old schema leaves the file as it is."""
    try:
        connection = sqlite3.connect(str(path), timeout=0.5)
    except sqlite3.Error:
        return
    try:
        present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        missing = [(name, table) for name, table in ID_INDEXES.items() if name not in present and table in present]
        if missing and os.access(path, os.W_OK):
            with connection:
                for name, table in missing:
                    connection.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table}(id)")
    except sqlite3.Error as exc:
        log.debug("database %s: row-id indexes not added (%s)", path, exc)
    finally:
        connection.close()


# The key-value tables ase.db keeps beside systems.key_value_pairs, for its queries.
KEY_VALUE_TABLES = ("keys", "text_key_values", "number_key_values")


def update_key_values(db: Any, updates: list[tuple[int, dict[str, Any]]]) -> None:
    """``db.update(row_id, **values)`` for many rows of an ASE SQLite database, in a few
    statements on ``db.connection`` (an open transaction). ase.db's update reads and decodes
    each whole row (positions, data) and writes its data back: 0.3 ms a row, a third of a
    select's own time on 700 candidates. Written as ase.db's ``SQLite3Database._update``
    writes (key_value_pairs JSON, the key-value tables' entries of each key), so that ase.db
    reads and queries these rows as its own. KeyError for a row that does not exist."""
    from ase.db.core import check, now

    values_of: dict[int, dict[str, Any]] = {}
    named: set[str] = set()
    for row_id, values in updates:
        # ase's check of a key's name (a chemical-formula parse) costs 25 us: once per key;
        # a value is checked each time, except a number under a key already checked, which passes.
        unchecked = {key: value for key, value in values.items()
                     if key not in named or not isinstance(value, (numbers.Real, np.bool_))}
        if unchecked:
            check(unchecked)
            named.update(unchecked)
        values_of.setdefault(int(row_id), {}).update(values)
    ids = list(values_of)
    old = key_values_of(db, ids)
    missing = [row_id for row_id in ids if row_id not in old]
    if missing:
        raise KeyError(f"no row id={missing[0]}")
    merged = {row_id: {**old[row_id], **values} for row_id, values in values_of.items()}
    mtime = now()
    cursor = db.connection.cursor()
    cursor.executemany("UPDATE systems SET mtime=?, key_value_pairs=? WHERE id=?",
                       [(mtime, db.encode(kvp), row_id) for row_id, kvp in merged.items()])
    # Each key given ends with the entries ase's update leaves: one in `keys`, one in the
    # table of its value's kind (ase rewrites every key of the row: the same end state). A
    # key a row already had keeps its `keys` entry and, keeping its kind, has its value
    # updated in place: re-scoring 7,000 candidates wrote 6 statements a key, now 1.
    deleted: dict[str, list] = {table: [] for table in KEY_VALUE_TABLES}
    updated: dict[str, list] = {"text_key_values": [], "number_key_values": []}
    inserted: dict[str, list] = {table: [] for table in KEY_VALUE_TABLES}
    for row_id, values in values_of.items():
        before = old[row_id]
        for key in values:
            value = merged[row_id][key]
            table = _table_of(value)
            stored = float(value) if table == "number_key_values" else value
            if key not in before:
                inserted["keys"].append((key, row_id))
                inserted[table].append((key, stored, row_id))
            elif _table_of(before[key]) == table:
                updated[table].append((stored, row_id, key))
            else:
                deleted[_table_of(before[key])].append((row_id, key))
                inserted[table].append((key, stored, row_id))
    for table, rows in deleted.items():
        cursor.executemany(f"DELETE FROM {table} WHERE id=? AND key=?", rows)
    for table, rows in updated.items():
        cursor.executemany(f"UPDATE {table} SET value=? WHERE id=? AND key=?", rows)
    cursor.executemany("INSERT INTO keys VALUES (?, ?)", inserted["keys"])
    cursor.executemany("INSERT INTO text_key_values VALUES (?, ?, ?)", inserted["text_key_values"])
    cursor.executemany("INSERT INTO number_key_values VALUES (?, ?, ?)", inserted["number_key_values"])


def key_values_of(db: Any, ids: list[int]) -> dict[int, dict[str, Any]]:
    """{row id: its key-value pairs} of the rows of ``ids`` that exist, read on ``db.connection``."""
    found: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):  # under SQLite's limit on bound parameters
        chunk = [int(row_id) for row_id in ids[start:start + 500]]
        marks = ",".join("?" * len(chunk))
        for row_id, text in db.connection.execute(
                f"SELECT id, key_value_pairs FROM systems WHERE id IN ({marks})", chunk):
            found[row_id] = key_values(db, text)
    return found


def _table_of(value: Any) -> str:
    """The key-value table ase.db files ``value`` in (``SQLite3Database._update``)."""
    return "number_key_values" if isinstance(value, (numbers.Real, np.bool_)) else "text_key_values"
