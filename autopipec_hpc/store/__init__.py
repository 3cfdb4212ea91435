"""The store: one ASE database holding structure rows and training records.

``database.py`` is the connection (checks, transactions, paging), ``structures.py``
the structure rows, ``records.py`` the training records with their claims and lock,
``explorations.py`` an exploration's harvest and marker.
``DatabaseManager`` is the handle every caller gets: open it once, pass it on.
"""

from __future__ import annotations

from autopipec_hpc.store.explorations import ExplorationRows
from autopipec_hpc.store.records import TrainingRecords
from autopipec_hpc.store.structures import StructureRows


class DatabaseManager(TrainingRecords, StructureRows, ExplorationRows):
    """One ASE database (a SQLite path by default, or any URL ``ase.db`` accepts)."""
