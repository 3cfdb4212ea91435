"""Hot MD stability: NVT (Langevin) far above the melting point, NVE for the energy
drift, then a quench. A potential without short-range repulsion lets atoms fuse here;
V = V_ACE + V_ZBL should not (the seed's claim, measured).

The run stops at the first sign of failure (a fused pair, NaN, a temperature blow-up),
so a bad potential costs little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from autopipec_hpc.validate.properties import pair_radius

# Empirical (Lindemann-like): k_B T_m ~ 0.011 B0 V0, within about 20 % for Cu (1,315 K for
# 1,358), Al, Fe, Ni, W and Si, a factor 2 for Na and Pb. From the potential's own EOS, not its
# isolated-atom energy: with reference energies fitted by least squares (the default) that
# energy means nothing. Clamped, so that a potential with a wild EOS still runs.
MELTING_PER_BV = 0.011
MELTING_CLAMP_K = (300.0, 5000.0)
MELTING_FALLBACK_K = 1000.0  # where the EOS could not be fitted (the gate fails it anyway)
TRACE_EVERY = 10


def melting_estimate(b0_gpa: float | None, v0: float | None) -> float:
    """T_m in K from the bulk modulus (GPa) and the volume per atom (A^3)."""
    if b0_gpa is None or v0 is None:
        return MELTING_FALLBACK_K
    t = MELTING_PER_BV * b0_gpa * units.GPa * v0 / units.kB
    return float(min(max(t, MELTING_CLAMP_K[0]), MELTING_CLAMP_K[1])) if math.isfinite(t) else MELTING_FALLBACK_K


@dataclass
class MDResult:
    temperature_k: float
    steps_done: int
    failure: str = ""  # empty: stable
    min_distance: float = math.inf  # the shortest pair distance seen, Angstrom
    fused_threshold: float = 0.0
    max_temperature_k: float = 0.0
    nve_drift_mev_per_atom_ps: float | None = None
    quench_min_distance: float | None = None
    time_ps: list[float] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    min_distances: list[float] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        return not self.failure


def fused_thresholds(symbols: list[str], fraction: float) -> dict[tuple[str, str], float]:
    return {tuple(sorted(p)): fraction * pair_radius(*p) for p in combinations_with_replacement(sorted(set(symbols)), 2)}


def closest_pair(atoms: Atoms, thresholds: dict[tuple[str, str], float]) -> tuple[float, bool]:
    """The shortest pair distance (periodic) and whether any pair is below its threshold."""
    from vesin import NeighborList

    cutoff = max(max(thresholds.values()) * 3, 3.0)
    box = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
    i, j, d = NeighborList(cutoff=cutoff, full_list=False).compute(
        points=atoms.positions, box=box, periodic=bool(atoms.pbc.all()), quantities="ijd")
    if len(d) == 0:
        return math.inf, False
    symbols = np.array(atoms.get_chemical_symbols())
    limit = np.array([thresholds[tuple(sorted((a, b)))] for a, b in zip(symbols[i], symbols[j])])
    return float(d.min()), bool(np.any(d < limit))


def md_stability(atoms: Atoms, calc: Calculator, temperature_k: float, steps: int, nve_steps: int,
                 quench_steps: int, timestep_fs: float, fused_fraction: float, blowup_factor: float,
                 seed: int = 0) -> MDResult:
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    thresholds = fused_thresholds(atoms.get_chemical_symbols(), fused_fraction)
    result = MDResult(temperature_k=temperature_k, steps_done=0, fused_threshold=min(thresholds.values()))
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=np.random.default_rng(seed))

    def check(step: int) -> str:
        if not (np.all(np.isfinite(atoms.positions)) and math.isfinite(atoms.get_potential_energy())):
            return f"NaN at step {step}"
        dmin, fused = closest_pair(atoms, thresholds)
        t = float(atoms.get_temperature())
        result.min_distance = min(result.min_distance, dmin)
        result.max_temperature_k = max(result.max_temperature_k, t)
        result.time_ps.append(step * timestep_fs / 1000)
        result.temperatures.append(t)
        result.min_distances.append(dmin)
        if fused:
            return f"fused atoms at step {step}: a pair at {dmin:.2f} A"
        if t > blowup_factor * temperature_k:
            return f"temperature blow-up at step {step}: {t:.0f} K"
        return ""

    dt = timestep_fs * units.fs
    nvt = Langevin(atoms, dt, temperature_K=temperature_k, friction=0.01 / units.fs, fixcm=False,
                   rng=np.random.default_rng(seed))
    for done in range(TRACE_EVERY, steps + 1, TRACE_EVERY):
        nvt.run(TRACE_EVERY)
        result.steps_done = done
        result.failure = check(done)
        if result.failure:
            return result
    nve = VelocityVerlet(atoms, dt)
    times, totals = [], []
    for done in range(0, nve_steps + 1, TRACE_EVERY):
        if done:
            nve.run(TRACE_EVERY)
            result.failure = check(steps + done)
            if result.failure:
                return result
        times.append(done * timestep_fs / 1000)
        totals.append(float(atoms.get_total_energy()) / len(atoms))
    result.nve_drift_mev_per_atom_ps = float(np.polyfit(times, totals, 1)[0] * 1000)
    atoms.set_velocities(np.zeros_like(atoms.positions))
    FIRE(atoms, logfile=None).run(fmax=0.05, steps=quench_steps)
    dmin, fused = closest_pair(atoms, thresholds)
    result.quench_min_distance = dmin
    if fused or not math.isfinite(atoms.get_potential_energy()):
        result.failure = f"the quench fused atoms: a pair at {dmin:.2f} A"
    return result
