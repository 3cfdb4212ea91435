"""Exploration rows: an exploration's harvest as CANDIDATE rows and its marker, in one transaction."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ase import Atoms

from autopipec_hpc.store.database import Database, _clean_value
from autopipec_hpc.store.structures import StructureRows

# The marker row of an imported exploration (active/explore_job.py): written with its candidates.
EXPLORATION_RECORD = "exploration"


class ExplorationRows(Database):
    def commit_exploration(self, generation: int, frames: Sequence[tuple[Atoms, str, dict[str, Any]]],
                           values: dict[str, Any], data: dict[str, Any]) -> list[int]:
        """In one transaction: every frame a CANDIDATE row (config_type, provenance key-value
        pairs) and a ``record=exploration`` row with the report's figures; the new row ids."""
        ids = []
        clean = {k: _clean_value(v) for k, v in values.items()}
        with self._transaction() as db:
            for atoms, config_type, provenance in frames:
                kept = {k: _clean_value(v) for k, v in provenance.items()}
                ids.append(StructureRows._write_candidate(db, atoms, config_type,
                                                          {k: v for k, v in kept.items() if v is not None}))
            db.write(Atoms(), record=EXPLORATION_RECORD, generation=int(generation), updated=time.time(),
                     data=data, **{k: v for k, v in clean.items() if v is not None})
        return ids
