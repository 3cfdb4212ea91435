"""The gate: which properties fail a generation, each named with its figure and the
tolerance it missed, so that one line tells a person what is wrong."""

from __future__ import annotations

from autopipec_hpc.validate.report import ValidationReport
from autopipec_hpc.validate.settings import ValidationConfig


def _relative(value: float, reference: float) -> float:
    return abs(value / reference - 1) if reference else float("inf")


def verdict(report: ValidationReport, settings: ValidationConfig) -> list[str]:
    """The failed properties of ``report`` under ``settings.gates``; empty: it passes."""
    gates, floor = settings.gates, settings.dimer_min_energy_ev
    failed: list[str] = []
    for e in report.elements:
        where = f"{e.element} {e.phase}"
        for prop, why in e.errors.items():
            failed.append(f"{where} {prop}: {why}")
        eos = e.eos
        if eos is not None and eos.reference is not None:
            if gates.a0_tolerance:
                mine, ref, name = (eos.a0, eos.ref_a0, "a0") if eos.a0 and eos.ref_a0 else (eos.v0, eos.ref_v0, "V0")
                if ref is not None and _relative(mine, ref) > gates.a0_tolerance:
                    failed.append(f"{where} {name} {mine:.4g} vs {ref:.4g} ({eos.reference}): off by "
                                  f"{100 * _relative(mine, ref):.1f} % > {100 * gates.a0_tolerance:g} %")
            if gates.b0_tolerance and eos.ref_b0_gpa is not None:
                off = _relative(eos.b0_gpa, eos.ref_b0_gpa)
                if off > gates.b0_tolerance:
                    failed.append(f"{where} B0 {eos.b0_gpa:.1f} vs {eos.ref_b0_gpa:.1f} GPa ({eos.reference}): off by "
                                  f"{100 * off:.0f} % > {100 * gates.b0_tolerance:g} %")
        if gates.elastic_stability and e.born_stable is False:
            failed.append(f"{where} elastic constants unstable (Born): C11 {e.c11_gpa:.0f}, C12 {e.c12_gpa:.0f}, "
                          f"C44 {e.c44_gpa:.0f} GPa")
        if gates.vacancy_positive and e.vacancy_ev is not None and not e.vacancy_ev > 0:
            failed.append(f"{where} vacancy formation energy {e.vacancy_ev:.2f} eV <= 0")
        if gates.md_stable and e.md_failure:
            failed.append(f"{where} hot MD at {e.md_temperature_k:.0f} K: {e.md_failure}")
        drift = e.md_nve_drift_mev_per_atom_ps
        if gates.md_max_drift_mev_per_atom_ps and drift is not None \
                and abs(drift) > gates.md_max_drift_mev_per_atom_ps:
            failed.append(f"{where} NVE drift {drift:.2f} meV/atom/ps > {gates.md_max_drift_mev_per_atom_ps:g}")
    if gates.dimer_repulsive:
        for d in report.dimers:
            if not d.repulsive:
                failed.append(f"dimer {d.pair} has a spurious well: its first minimum at {d.r_min:.2f} A is "
                              f"closer than {d.min_floor:.2f} A")
            if d.energy_at_check < floor:
                failed.append(f"dimer {d.pair} energy {d.energy_at_check:.2f} eV at {d.check_distance:.2f} A "
                              f"below {floor:g} eV")
    return failed
