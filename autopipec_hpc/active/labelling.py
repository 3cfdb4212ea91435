"""Labelling: the structures a selection requested get energies and forces from any ASE calculator.

``label_requested`` moves rows DFT_REQUESTED -> TRAINING_READY, one row at a time, so an
interrupted run loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
import importlib
import json
import math
import numpy as np
from autopipec_hpc.errors import LabellingError
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager


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
    kwargs: Any = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise LabellingError(f"--kwargs is not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            raise LabellingError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
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


def label_requested(
    db: DatabaseManager, labeller: Labeller, notify: Callable[[str], None] | None = None
) -> LabelResult:
    """Label every DFT_REQUESTED row with the labeller's calculator and make it TRAINING_READY.
    Each row is written as soon as it is labelled, so an interrupted run loses nothing."""
    spec = labeller.spec
    say = notify or (lambda message: None)
    done: list[int] = []
    ids = [row.id for row in db.iter_rows(status=StructureStatus.DFT_REQUESTED)]
    for row_id in ids:
        row = db.get_row(row_id)
        if row.get("status") != StructureStatus.DFT_REQUESTED:
            continue
        atoms = row.toatoms()
        atoms.calc = labeller.calculator()
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces(), dtype=float)
        except Exception as exc:
            raise LabellingError(
                f"structure id={row_id}: {spec} failed ({exc}); {len(done)} rows labelled before it"
            ) from None
        if not math.isfinite(energy) or forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
            raise LabellingError(f"structure id={row_id}: {spec} gave a non-finite energy or bad forces")
        db.set_labels(row_id, energy, forces, StructureStatus.TRAINING_READY, labelled_by=spec)
        done.append(row_id)
    say(f"labelled {len(done)} structures with {spec}")
    return LabelResult(done)
