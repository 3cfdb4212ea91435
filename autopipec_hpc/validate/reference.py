"""What the data says: each element's ground state (the phase of its lowest-energy
structure in the dataset) and the DFT energy-volume sets to compare an EOS with.

A phase is named fcc, bcc or hcp where the structure's neighbour distances (scaled by
the volume per atom, so strain barely matters) match the ideal lattice's, else "other";
no symmetry library needed.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk

NEIGHBOURS = 26  # enough to tell hcp from fcc (their 19th and 20th neighbours differ)
PHASE_TOLERANCE = 0.06  # RMS of scaled distances; ideal lattices differ by 0.035 or more
PHASES = ("fcc", "bcc", "hcp")


def fingerprint(atoms: Atoms) -> np.ndarray:
    """The mean sorted distances to the nearest NEIGHBOURS atoms, in units of (V/atom)^(1/3)."""
    from vesin import NeighborList

    scale = (atoms.get_volume() / len(atoms)) ** (1 / 3)
    i, d = NeighborList(cutoff=2.3 * scale, full_list=True).compute(
        points=atoms.positions, box=atoms.cell.array, periodic=True, quantities="id")
    rows = [np.sort(d[i == k])[:NEIGHBOURS] for k in range(len(atoms))]
    if any(len(r) < NEIGHBOURS for r in rows):
        return np.full(NEIGHBOURS, np.inf)
    return np.mean(rows, axis=0) / scale


def _ideal(phase: str) -> np.ndarray:
    return fingerprint(bulk("Cu", phase, a=3.6) if phase != "hcp" else bulk("Cu", "hcp", a=2.55))


def phase_of(atoms: Atoms) -> str:
    if not atoms.pbc.all() or len(set(atoms.numbers)) != 1:
        return "other"
    mine = fingerprint(atoms)
    scores = {p: float(np.sqrt(np.mean((mine - _ideal(p)) ** 2))) for p in PHASES}
    best = min(scores, key=scores.get)
    return best if scores[best] < PHASE_TOLERANCE else "other"


def ideal_cell(element: str, phase: str, volume_per_atom: float, like: Atoms) -> Atoms:
    """The primitive ideal cell of ``phase`` at ``volume_per_atom``; for "other" (and hcp,
    whose c/a the data knows better than an ideal), the data's structure scaled."""
    if phase == "fcc":
        return bulk(element, "fcc", a=(4 * volume_per_atom) ** (1 / 3))
    if phase == "bcc":
        return bulk(element, "bcc", a=(2 * volume_per_atom) ** (1 / 3))
    from autopipec_hpc.validate.properties import scaled

    return scaled(like, volume_per_atom)


def conventional_cubic(element: str, phase: str, a0: float) -> Atoms:
    return bulk(element, phase, a=a0, cubic=True)


@dataclass(frozen=True)
class LabelledStructure:
    atoms: Atoms
    energy: float  # DFT, eV
    config_type: str

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.atoms)

    @property
    def volume_per_atom(self) -> float:
        return self.atoms.get_volume() / len(self.atoms)


@dataclass(frozen=True)
class GroundState:
    element: str
    phase: str
    structure: LabelledStructure  # the data's lowest-energy structure of this element
    eos_set: str | None  # the config_type of a DFT E(V) set of this phase, if any
    eos_points: list[LabelledStructure]
    # the element's other DFT E(V) sets: (phase, config_type, points), e.g. bcc and hcp beside fcc
    other_sets: tuple[tuple[str, str, list[LabelledStructure]], ...] = ()


def read_dataset(paths: Iterable[Path]) -> list[LabelledStructure]:
    """The labelled structures of the dataset pickles (train and test), DFT energies."""
    from autopipec_hpc.dataset_files import read_pickle

    out = []
    for path in paths:
        frame = read_pickle(path)
        for atoms, energy, ctype in zip(frame["ase_atoms"], frame["energy_dft"], frame["config_type"]):
            out.append(LabelledStructure(atoms, float(energy), str(ctype)))
    return out


def ground_states(structures: Sequence[LabelledStructure], patterns: Sequence[str]) -> list[GroundState]:
    """Per element with periodic elemental structures in the data: its lowest-energy one, its
    phase, and the largest DFT E(V) set (config_type matching ``patterns``) of that phase."""
    by_element: dict[str, list[LabelledStructure]] = defaultdict(list)
    for s in structures:
        if s.atoms.pbc.all() and len(set(s.atoms.numbers)) == 1:
            by_element[s.atoms[0].symbol].append(s)
    states = []
    for element in sorted(by_element):
        mine = by_element[element]
        lowest = min(mine, key=lambda s: s.energy_per_atom)
        phase = phase_of(lowest.atoms)
        sets: dict[str, list[LabelledStructure]] = defaultdict(list)
        for s in mine:
            if any(fnmatch.fnmatch(s.config_type.lower(), p.lower()) for p in patterns):
                sets[s.config_type].append(s)
        phases = {name: phase_of(min(points, key=lambda s: s.energy_per_atom).atoms)
                  for name, points in sets.items() if len(points) >= 5}
        matching = {name: sets[name] for name, p in phases.items() if p == phase}
        name = max(matching, key=lambda n: len(matching[n]), default=None)
        others = tuple((p, n, sets[n]) for n, p in sorted(phases.items()) if n != name)
        states.append(GroundState(element, phase, lowest, name, matching.get(name, []), others))
    return states
