"""Validate one calculator on the ground states the data names: every property of
``validate/`` per element, the dimer of every pair, the gate's verdict, the report.

A property that cannot be computed (no EOS minimum, NaN) is recorded by name and fails
the gate; the others are still computed, so the report says everything that is wrong.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from itertools import combinations_with_replacement
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator

from autopipec_hpc.errors import PropertyError
from autopipec_hpc.validate import properties as props
from autopipec_hpc.validate.gate import verdict
from autopipec_hpc.validate.md import md_stability, melting_estimate
from autopipec_hpc.validate.reference import GroundState, conventional_cubic, ideal_cell
from autopipec_hpc.validate.report import DimerResult, ElementResult, EOSResult, PhaseResult, ValidationReport
from autopipec_hpc.validate.settings import ValidationConfig

log = logging.getLogger(__name__)

# What a bad potential may raise while a property is computed: recorded, not a crash.
PROPERTY_FAILURES = (PropertyError, ArithmeticError, ValueError, np.linalg.LinAlgError)


def _eos(state: GroundState, calc: Calculator, settings: ValidationConfig,
         previous: ValidationReport | None) -> EOSResult:
    start = ideal_cell(state.element, state.phase, state.structure.volume_per_atom, state.structure.atoms)
    scan = props.eos_scan(start, calc, settings.eos_volume_range, settings.eos_points)
    out = EOSResult(volumes=scan.volumes, energies=scan.energies, v0=scan.fit.v0, e0=scan.fit.e0,
                    b0_gpa=scan.fit.b0_gpa, a0=props.cubic_lattice_constant(state.phase, scan.fit.v0))
    if state.eos_points:
        points = sorted(state.eos_points, key=lambda s: s.volume_per_atom)
        volumes = np.array([s.volume_per_atom for s in points])
        dft = props.EOSFit.fit(volumes, np.array([s.energy_per_atom for s in points]))
        return out.model_copy(update={
            "reference": f"DFT {state.eos_set}", "ref_v0": dft.v0, "ref_b0_gpa": dft.b0_gpa,
            "ref_a0": props.cubic_lattice_constant(state.phase, dft.v0), "dft_volumes": volumes.tolist(),
            "dft_energies": [s.energy_per_atom for s in points],
            "dft_energies_model": [props.energy_per_atom(s.atoms, calc) for s in points]})
    before = next((e for e in (previous.elements if previous else [])
                   if e.element == state.element and e.phase == state.phase and e.eos), None)
    if before is not None and before.eos is not None:
        return out.model_copy(update={"reference": f"generation {previous.generation}", "ref_v0": before.eos.v0,
                                      "ref_b0_gpa": before.eos.b0_gpa, "ref_a0": before.eos.a0})
    return out


def _phases(state: GroundState, calc: Calculator, eos: EOSResult | None) -> list[PhaseResult]:
    """The other phases' DFT E(V) sets and the potential on the same cells."""
    out = []
    for phase, name, points in state.other_sets:
        points = sorted(points, key=lambda s: s.volume_per_atom)
        volumes = np.array([s.volume_per_atom for s in points])
        dft = np.array([s.energy_per_atom for s in points])
        model = np.array([props.energy_per_atom(s.atoms, calc) for s in points])
        fit, ref = props.EOSFit.fit(volumes, model), props.EOSFit.fit(volumes, dft)
        ground_ref = (props.EOSFit.fit(np.array([s.volume_per_atom for s in state.eos_points]),
                                       np.array([s.energy_per_atom for s in state.eos_points])).e0
                      if state.eos_points else None)
        out.append(PhaseResult(
            phase=phase, reference=name, volumes=volumes.tolist(), dft_energies=dft.tolist(), energies=model.tolist(),
            v0=fit.v0, b0_gpa=fit.b0_gpa, ref_v0=ref.v0, ref_b0_gpa=ref.b0_gpa,
            above_ground_mev=1000 * (fit.e0 - eos.e0) if eos is not None else None,
            ref_above_ground_mev=1000 * (ref.e0 - ground_ref) if ground_ref is not None else None))
    return out


def validate_element(state: GroundState, calc: Calculator, settings: ValidationConfig,
                     previous: ValidationReport | None = None) -> ElementResult:
    result = ElementResult(element=state.element, phase=state.phase)
    errors: dict[str, str] = {}
    updates: dict = {}
    v0 = state.structure.volume_per_atom
    try:
        eos = _eos(state, calc, settings, previous)
        updates["eos"], v0 = eos, eos.v0
    except PROPERTY_FAILURES as exc:
        errors["EOS"] = str(exc)
    try:
        updates["phases"] = _phases(state, calc, updates.get("eos"))
    except PROPERTY_FAILURES as exc:
        errors["other phases' EOS"] = str(exc)
    cubic = state.phase in ("fcc", "bcc")
    per_cell = {"fcc": 4, "bcc": 2}.get(state.phase, 1)
    bulk_cell = (conventional_cubic(state.element, state.phase, (per_cell * v0) ** (1 / 3)) if cubic
                 else ideal_cell(state.element, state.phase, v0, state.structure.atoms))
    if cubic:
        try:
            c = props.cubic_elastic(bulk_cell, calc, settings.elastic_strain)
            updates.update(c11_gpa=c.c11, c12_gpa=c.c12, c44_gpa=c.c44, born_stable=c.born_stable)
        except PROPERTY_FAILURES as exc:
            errors["elastic constants"] = str(exc)
    big = props.supercell(bulk_cell, settings.supercell_atoms)
    try:
        updates["vacancy_ev"] = props.vacancy_formation_energy(big, calc)
    except PROPERTY_FAILURES as exc:
        errors["vacancy"] = str(exc)
    eos = updates.get("eos")
    temperature = settings.md_temperature_k or 2 * melting_estimate(eos.b0_gpa if eos else None, v0 if eos else None)
    md = md_stability(big, calc, temperature, settings.md_steps, settings.md_nve_steps, settings.md_quench_steps,
                      settings.md_timestep_fs, settings.md_fused_fraction, settings.md_blowup_factor, settings.seed)
    updates.update(
        md_temperature_k=temperature,
        md_failure=md.failure, md_min_distance=md.min_distance if np.isfinite(md.min_distance) else None,
        md_fused_threshold=md.fused_threshold, md_quench_min_distance=md.quench_min_distance,
        md_nve_drift_mev_per_atom_ps=md.nve_drift_mev_per_atom_ps, md_time_ps=md.time_ps,
        md_temperatures=md.temperatures, md_min_distances=md.min_distances, errors=errors)
    return result.model_copy(update=updates)


def validate_dimers(elements: Sequence[str], calc: Calculator, settings: ValidationConfig, cutoff: float,
                    zbl: Calculator | None = None) -> list[DimerResult]:
    out = []
    for a, b in combinations_with_replacement(sorted(elements), 2):
        curve = props.dimer_curve(a, b, calc, settings.dimer_min_distance, cutoff, settings.dimer_step,
                                  settings.dimer_check_distance, settings.dimer_well_fraction)
        reference = (props.dimer_curve(a, b, zbl, settings.dimer_min_distance, cutoff, settings.dimer_step).energies
                     if zbl is not None else [])
        out.append(DimerResult(pair=curve.pair, distances=curve.distances, energies=curve.energies,
                               zbl_energies=reference, check_distance=curve.check_distance,
                               energy_at_check=curve.energy_at_check, r_min=curve.r_min,
                               min_floor=curve.min_floor, repulsive=curve.repulsive))
    return out


def validate(calc: Calculator, states: Sequence[GroundState], elements: Sequence[str], settings: ValidationConfig,
             generation: int, cutoff: float, zbl: Calculator | None = None,
             previous: ValidationReport | None = None) -> ValidationReport:
    """Every property, then the gate: the report with its verdict (``failures``)."""
    started = time.monotonic()
    results = [validate_element(s, calc, settings, previous) for s in states]
    try:
        dimers = validate_dimers(elements, calc, settings, cutoff, zbl)
        dimer_error = ""
    except PROPERTY_FAILURES as exc:
        dimers, dimer_error = [], str(exc)
    report = ValidationReport(generation=generation, elements=results, dimers=dimers)
    failures = verdict(report, settings) + ([f"dimers: {dimer_error}"] if dimer_error else [])
    if not states:
        log.warning("generation %s: no periodic elemental structure in the data; only dimers validated", generation)
    return report.model_copy(update={"failures": failures, "wall_time_s": time.monotonic() - started})


def previous_report(potentials_root: Path, generation: int) -> ValidationReport | None:
    """The validation of the newest published generation before ``generation``, if any."""
    published = sorted((int(p.name) for p in Path(potentials_root).glob("*") if p.name.isdigit()
                        and int(p.name) < generation), reverse=True)
    for number in published:
        report = ValidationReport.load(Path(potentials_root) / str(number))
        if report is not None:
            return report
    return None


def validate_potential(folder: Path, dataset_paths: Sequence[Path], elements: Sequence[str], cutoff: float,
                       settings: ValidationConfig, generation: int, output_dir: Path) -> ValidationReport:
    """The validation of a published or staged potential folder (``registry.load_calculator``:
    ACE + ZBL + reference energies, the deployed model), on the ground states of its dataset;
    the report and its figure are written into ``folder``."""
    from autopipec_hpc import registry
    from autopipec_hpc.physics import ZBLCalculator
    from autopipec_hpc.validate.reference import ground_states, read_dataset
    from autopipec_hpc.validate.report import PLOT, plot

    manifest = registry.read_manifest(folder)
    states = ground_states(read_dataset(dataset_paths), settings.eos_reference)
    report = validate(registry.load_calculator(folder), states, elements, settings, generation, cutoff,
                      zbl=ZBLCalculator(manifest.zbl_inner, manifest.zbl_outer),
                      previous=previous_report(registry.potentials_root(output_dir), generation))
    report.save(folder)
    plot(report, Path(folder) / PLOT)
    return report
