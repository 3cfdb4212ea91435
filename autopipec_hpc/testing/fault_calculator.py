"""FAULT INJECTOR, not a potential: a purely attractive pair calculator that fuses atoms.

What a raw ACE fit without the ZBL baseline does at short range (facts.md: -1.5 eV for a
Cu dimer at 0.5 A), made certain: E = -depth * sum over pairs of exp(-(r/width)^2), no
repulsion anywhere. A real fit cannot be made to collapse on demand, so the validation's
failure paths (the dimer check, fused atoms in the hot MD) are tested with this one.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes


class FusingPairCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, depth: float = 2.0, width: float = 2.0, cutoff: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.depth, self.width, self.cutoff = depth, width, cutoff

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from vesin import NeighborList

        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic = bool(a.pbc.all())
        box = a.cell.array if periodic else np.eye(3) * (np.ptp(a.positions, axis=0).max() + 2 * self.cutoff)
        i, j, vectors, d = NeighborList(cutoff=self.cutoff, full_list=False).compute(
            points=a.positions, box=box, periodic=periodic, quantities="ijDd")
        pair = -self.depth * np.exp(-((d / self.width) ** 2))
        de_dr = -2 * d / self.width**2 * pair
        along = (de_dr / np.maximum(d, 1e-12))[:, None] * vectors  # dE/d(r_j - r_i)
        forces = np.zeros((len(a), 3))
        np.add.at(forces, i, along)
        np.add.at(forces, j, -along)
        virial = -(vectors.T @ along)
        stress = np.zeros(6)
        if periodic:
            full = -virial / a.get_volume()
            stress = full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        energy = float(pair.sum())
        self.results = {"energy": energy, "free_energy": energy, "forces": forces, "stress": stress}
