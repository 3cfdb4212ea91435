"""The dataset stage's files: pacemaker's gzip pickles (sharded) and the Extended XYZ export.

Written atomically: a half-written file never replaces a good one.
"""

from __future__ import annotations

from ase import Atoms
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from typing import IO
import gzip
import numpy as np
import pandas as pd
from autopipec_hpc.files import atomic_output


PICKLE_PROTOCOL = 4  # what pacemaker's own writers use; readable by older pandas


# -- pacemaker's file format -------------------------------------------------
def read_pickle(path: str | Path) -> pd.DataFrame:
    return pd.read_pickle(path, compression="gzip")


def write_pickle(df: pd.DataFrame, path: Path) -> None:
    """pacemaker's format: a gzip-compressed pandas pickle."""
    with atomic_output(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            df.to_pickle(gz, protocol=PICKLE_PROTOCOL)


# -- writers -------------------------------------------------------------------
class ShardedPickleWriter:
    """Rows -> ``{stem}-NNN.pckl.gzip`` files of at most ``shard_atoms`` atoms and
    ``shard_rows`` rows each: memory follows the shard, not the dataset."""

    def __init__(self, directory: Path, stem: str, shard_atoms: int, shard_rows: int) -> None:
        self.directory = directory
        self.stem = stem
        self.shard_atoms = shard_atoms
        self.shard_rows = shard_rows
        self.rows: list[dict[str, Any]] = []
        self.atoms_in_shard = 0
        self.files: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        natoms = len(row["ase_atoms"])
        if self.rows and (
            self.atoms_in_shard + natoms > self.shard_atoms or len(self.rows) >= self.shard_rows
        ):
            self._flush()
        self.rows.append(row)
        self.atoms_in_shard += natoms

    def _flush(self) -> None:
        name = f"{self.stem}-{len(self.files):03d}.pckl.gzip"
        write_pickle(pd.DataFrame(self.rows), self.directory / name)
        self.files.append(name)
        self.rows = []
        self.atoms_in_shard = 0

    def close(self) -> list[str]:
        if self.rows:
            self._flush()
        return self.files


def extxyz_frame(atoms: Atoms, energy: float, forces: np.ndarray, config_type: str,
                 db_id: int, force_weights: np.ndarray | None) -> Atoms:
    """The frame written to Extended XYZ: ``species pos forces [force_weights]`` columns,
    energy, config_type and database id in the comment line."""
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    # ASE's extxyz writer escapes quotes but not backslashes, and its reader takes a
    # backslash as an escape: doubled here, the label reads back unchanged.
    frame.info["config_type"] = config_type.replace("\\", "\\\\")
    frame.info["db_id"] = int(db_id)
    frame.info["energy"] = float(energy)
    # As plain arrays (not a calculator) so forces come before the weights column.
    frame.arrays["forces"] = np.asarray(forces, dtype=float)
    if force_weights is not None:
        frame.arrays["force_weights"] = np.asarray(force_weights, dtype=float)
    return frame


@contextmanager
def maybe_xyz(path: Path, enabled: bool) -> Iterator[IO | None]:
    if not enabled:
        yield None
        return
    with atomic_output(path, "w") as handle:
        yield handle
