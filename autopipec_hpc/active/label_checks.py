"""One structure through a labeller's calculator: a time limit, and the checks every result passes.

Each failure is one line naming what went wrong (the calculator's exception by its class
name and message, a timeout, a non-finite or misshapen result, a net force, moved atoms),
because that line is what ``LABEL_FAILED`` rows carry and the summaries count by reason.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from autopipec_hpc.active.labeller_config import LabellerConfig


class LabelTimeout(Exception):
    """A structure's calculation ran past the labeller's per-structure time limit."""


@dataclass(frozen=True)
class Label:
    """A checked result: what is stored on the row."""

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """LabelTimeout in this (main) thread after ``seconds``. Elsewhere no limit can be set
    (signals reach only the main thread): the job's own time limit is the bound there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise LabelTimeout(f"over the per-structure time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reason_of(exc: BaseException) -> str:
    """``KohnShamConvergenceError: Did not converge!``: the class name, then the message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_result(atoms: Atoms, computed: Atoms, energy: float, forces: Any, labeller: LabellerConfig
                 ) -> str | None:
    """Why the result cannot be stored as the row's label, or None when it passes."""
    if not math.isfinite(energy):
        return f"non-finite energy ({energy})"
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        return f"forces of shape {forces.shape}, expected ({len(atoms)}, 3)"
    if not np.isfinite(forces).all():
        return "non-finite forces"
    moved = float(np.abs(computed.positions - atoms.positions).max()) if len(atoms) else 0.0
    if moved > labeller.max_displacement or not np.allclose(computed.cell, atoms.cell, atol=labeller.max_displacement):
        # A relaxation (as a VASP run with IBRION >= 0 does): its forces belong to another geometry.
        return (f"the calculator moved the atoms (up to {moved:.3g} A) or the cell: labels of a relaxed "
                "geometry are refused; run single points (VASP: ibrion -1, nsw 0)")
    if atoms.pbc.all() and len(atoms) > 1:
        net = float(np.linalg.norm(forces.sum(axis=0)))
        if net > labeller.max_net_force:
            return f"net force {net:.3g} eV/A on a periodic cell (over max_net_force {labeller.max_net_force:g})"
    return None


def compute_label(atoms: Atoms, labeller: LabellerConfig, time_limit_s: float) -> Label:
    """Run the labeller on a copy of ``atoms`` within ``time_limit_s``. Raises the
    calculator's exception, LabelTimeout, or LabelCheckFailed with the check's reason."""
    computed = atoms.copy()
    computed.calc = labeller.make_calculator()
    with time_limit(time_limit_s):
        energy = float(computed.get_potential_energy())
        forces = np.array(computed.get_forces(), dtype=float)
        stress = _stress(computed) if labeller.stress else None
    why = check_result(atoms, computed, energy, forces, labeller)
    if why is not None:
        raise LabelCheckFailed(why)
    return Label(energy, forces, stress)


class LabelCheckFailed(Exception):
    """A result that a sanity check refused (the message says which)."""


class SuspiciousLabel(Exception):
    """A label far from a confident prediction of the generation that selected the structure."""


class Predictions:
    """The deployed potentials of the generations that selected rows (``generation -> folder``),
    each loaded once per task, for ``energy_window``: where the potential was confident
    (low gamma) a DFT energy far from its prediction is more likely a broken calculation
    (a wrong setup, a wrong magnetic state) than new physics."""

    def __init__(self, folders: dict[int, str]) -> None:
        self.folders = folders
        self._loaded: dict[int, Any] = {}

    def energy(self, generation: int, atoms: Atoms) -> float | None:
        if generation not in self.folders:
            return None
        if generation not in self._loaded:
            from autopipec_hpc.registry import load_calculator

            self._loaded[generation] = load_calculator(self.folders[generation])
        probe = atoms.copy()
        probe.calc = self._loaded[generation]
        return float(probe.get_potential_energy())


def check_suspicious(atoms: Atoms, energy: float, row: Any, labeller: LabellerConfig,
                     predictions: Predictions | None) -> None:
    """SuspiciousLabel when the energy per atom lies outside ``energy_window`` around the
    selecting generation's prediction on a structure whose gamma_max was at most
    ``confident_gamma``; nothing where no window, prediction or gamma is known."""
    if labeller.energy_window is None or predictions is None or not len(atoms):
        return
    generation, gamma = row.get("selected_by_generation"), row.get("gamma_max")
    if generation is None or gamma is None or float(gamma) > labeller.confident_gamma:
        return
    predicted = predictions.energy(int(generation), atoms)
    if predicted is None:
        return
    off = abs(energy - predicted) / len(atoms)
    if off > labeller.energy_window:
        raise SuspiciousLabel(f"energy {off:.3g} eV/atom from generation {int(generation)}'s prediction where it "
                              f"was confident (gamma_max {float(gamma):.2g} <= {labeller.confident_gamma:g}); "
                              f"over energy_window {labeller.energy_window:g}")


def _stress(atoms: Atoms) -> np.ndarray | None:
    """The stress where the calculator computes it (periodic cells); None where it does not."""
    if not atoms.pbc.all():
        return None
    calc = atoms.calc
    if "stress" not in getattr(calc, "implemented_properties", ()):
        return None
    stress = np.asarray(atoms.get_stress(), dtype=float)
    return stress if np.isfinite(stress).all() else None
