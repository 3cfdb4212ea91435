"""Frames from files: reading any ASE-readable file, and the one check of a frame's labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from autopipec_hpc.errors import ImportDataError


def read_frames(path: str | Path) -> Iterator[tuple[int, Atoms]]:
    """(index, Atoms) of every frame of an ASE-readable file; a file that is missing,
    a folder, or not a structure file is named in one ImportDataError."""
    path = Path(path)
    if not path.exists():
        raise ImportDataError(f"{path}: no such file")
    if path.is_dir():
        raise ImportDataError(f"{path}: is a directory, not a structure file")
    if path.stat().st_size == 0:
        raise ImportDataError(f"{path}: is empty; nothing was imported")
    try:
        yield from enumerate(ase.io.iread(str(path), index=":"))
    except ImportDataError:
        raise
    except Exception as exc:  # ASE's readers raise whatever their parser meets
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImportDataError(
            f"{path}: not a readable structure file ({type(exc).__name__}: {reason[:160]}); nothing was imported"
        ) from None


def labels_of(atoms: Atoms, where: str) -> tuple[float, np.ndarray]:
    """Energy and forces of an imported frame, or an error naming the frame."""
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    if energy is None:
        raise ImportDataError(f"{where} has no energy; nothing was imported")
    if forces is None:
        raise ImportDataError(f"{where} has no forces; nothing was imported")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise ImportDataError(
            f"{where} has forces of shape {forces.shape}, expected ({len(atoms)}, 3); nothing was imported"
        )
    return float(energy), forces


def carried_labels(atoms: Atoms) -> list[str]:
    """Which labels ("energy", "forces") a frame read from a file carries, in any of the
    places ASE's readers put them."""
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    carried = []
    if results.get("energy") is not None or atoms.info.get("energy") is not None:
        carried.append("energy")
    if results.get("forces") is not None or atoms.arrays.get("forces") is not None:
        carried.append("forces")
    return carried
