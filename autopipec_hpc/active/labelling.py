"""Labelling: the structures a selection requested get energies and forces from any ASE calculator.

``label_requested`` moves rows DFT_REQUESTED -> LABELLING (claimed) -> TRAINING_READY, one
row at a time, so an interrupted run loses nothing and two labellers never compute one row
twice; a failed row goes back to DFT_REQUESTED with its ``label_error``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
import importlib
import json
import logging
import math
import os
import socket
import time

import numpy as np

from autopipec_hpc.active.labeller_config import parse_kwargs
from autopipec_hpc.errors import LabellingError, one_line
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager

log = logging.getLogger(__name__)


# -- labelling -------------------------------------------------------------------------
def load_calculator_class(spec: str, kwargs_json: str | None = None) -> tuple[type, dict[str, Any]]:
    """``MODULE:CLASS`` and its keyword arguments (a JSON object), checked by making one."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise LabellingError(f"--calculator {spec!r}: expected MODULE:CLASS, e.g. ase.calculators.emt:EMT")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise LabellingError(f"--calculator {spec!r}: cannot import {module_name!r} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise LabellingError(f"--calculator {spec!r}: {module_name} has no class {class_name!r}")
    kwargs = parse_kwargs(kwargs_json)
    try:
        cls(**kwargs)
    except Exception as exc:
        raise LabellingError(f"--calculator {spec!r} refused --kwargs {json.dumps(kwargs)}: {exc}") from None
    return cls, kwargs


@dataclass(frozen=True)
class Labeller:
    """An ASE calculator named ``MODULE:CLASS`` with its keyword arguments, checked once."""

    spec: str
    cls: type
    kwargs: dict[str, Any]

    @classmethod
    def load(cls, spec: str, kwargs_json: str | None = None) -> "Labeller":
        """LabellingError naming ``--calculator`` or ``--kwargs`` if either is wrong."""
        calculator, kwargs = load_calculator_class(spec, kwargs_json)
        return cls(spec, calculator, kwargs)

    def calculator(self):
        return self.cls(**self.kwargs)


@dataclass
class LabelResult:
    labelled: list[int]
    atoms: int = 0  # atoms in the structures labelled: what the labels cost


# A LABELLING row claimed on another host is reckoned abandoned this long after its claim
# (its process cannot be asked from here); on its own host, the claimant's pid decides.
LABEL_LEASE_S = 24 * 3600.0


def claimant() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _abandoned(row, now: float) -> str | None:
    """Why a LABELLING row's claimant is gone, or None while it may still label it."""
    holder = str(row.get("label_claimed_by", ""))
    host, _, pid = holder.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return None if pid_alive(int(pid)) else f"its labeller {holder} ended"
    age = now - float(row.get("label_claimed_at", 0.0))
    return f"its labeller {holder or '(unknown)'} claimed it {age:.0f} s ago" if age > LABEL_LEASE_S else None


def recover_labels(db: DatabaseManager) -> tuple[list[int], list[int]]:
    """Under the records' lock: LABELLING rows whose labeller is gone go back to
    DFT_REQUESTED (nothing is lost with a killed labeller). Returns (recovered, still held)."""
    now = time.time()
    recovered, held = [], []
    with db.locked():
        for row in list(db.iter_rows(status=StructureStatus.LABELLING)):
            why = _abandoned(row, now)
            if why is None:
                held.append(row.id)
                continue
            log.warning("structure id=%s: %s; back to %s", row.id, why, StructureStatus.DFT_REQUESTED)
            if db.release_label(row.id, error=f"labelling abandoned: {why}", died=True) == StructureStatus.DFT_REQUESTED:
                recovered.append(row.id)
    return recovered, held


def label_requested(
    db: DatabaseManager, labeller: Labeller, notify: Callable[[str], None] | None = None,
    wait_s: float | None = None, poll_s: float = 2.0,
) -> LabelResult:
    """Label every DFT_REQUESTED row with the labeller's calculator and make it TRAINING_READY.

    Each row is claimed first (LABELLING, under the records' lock), so two labellers at once
    never compute a row twice; each is written as soon as it is labelled, so an interrupted
    run loses nothing. A failed row goes back to DFT_REQUESTED with its ``label_error`` and
    the run stops with a LabellingError naming it. With ``wait_s`` (the loop), it then waits
    that long at most for rows other labellers still hold, so that what follows sees them
    labelled."""
    spec = labeller.spec
    say = notify or (lambda message: None)
    done: list[int] = []
    atoms_done = 0
    me = claimant()
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        recover_labels(db)
        ids = [row.id for row in db.iter_rows(status=StructureStatus.DFT_REQUESTED)]
        for row_id in ids:
            with db.locked():
                if not db.claim_label(row_id, me):
                    continue  # labelled or claimed by another since the list was read
            atoms_done += _label_one(db, labeller, row_id, len(done))
            done.append(row_id)
        held = recover_labels(db)[1]
        if deadline is None or not held and not db.count(status=StructureStatus.DFT_REQUESTED):
            break
        if time.monotonic() > deadline:
            raise LabellingError(f"structures {', '.join(f'id={i}' for i in held[:10])} are still being labelled "
                                 f"by another labeller after {wait_s:.0f} s")
        time.sleep(poll_s)
    say(f"labelled {len(done)} structures ({atoms_done} atoms) with {spec}")
    return LabelResult(done, atoms_done)


def _label_one(db: DatabaseManager, labeller: Labeller, row_id: int, before: int) -> int:
    """Label the claimed row ``row_id``; on any failure (an interrupt too) it goes back to
    DFT_REQUESTED with the reason. Returns its atoms."""
    spec = labeller.spec
    atoms = db.get_row(row_id).toatoms()
    try:
        atoms.calc = labeller.calculator()
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces(), dtype=float)
        except Exception as exc:
            raise LabellingError(
                f"structure id={row_id}: {spec} failed ({exc}); {before} rows labelled before it"
            ) from None
        if not math.isfinite(energy) or forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
            raise LabellingError(f"structure id={row_id}: {spec} gave a non-finite energy or bad forces")
        db.set_labels(row_id, energy, forces, StructureStatus.TRAINING_READY, labelled_by=spec)
    except BaseException as exc:
        db.release_label(row_id, error=one_line(exc) if isinstance(exc, Exception) else type(exc).__name__)
        raise
    return len(atoms)
