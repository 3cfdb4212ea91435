"""The ``validation:`` section of the training config: what is computed, and the gates.

Defaults make sense for any elements: distances that depend on the pair scale with
the sum of covalent radii, the MD temperature with the potential's own B0 V0 (a
melting estimate). Each gate is turned off by ``false`` (or ``null``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# config_type names that hold a DFT energy-volume set (fnmatch, case-insensitive)
EOS_REFERENCE_PATTERNS = ("*murnaghan*", "*_ev*", "*eos*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A tolerance (> 0, checked below), or false: the gate is off.
Tolerance = float | Literal[False]


class ValidationGates(_Strict):
    """What fails a generation. ``false`` (or ``null``) turns one gate off; the property is
    still computed and reported. Off is stored as false, so a dump without nulls keeps it off."""

    a0_tolerance: Tolerance = Field(0.01, description="lattice constant vs the EOS reference, relative")
    b0_tolerance: Tolerance = Field(0.10, description="bulk modulus vs the EOS reference, relative")
    elastic_stability: bool = Field(True, description="Born criteria of every cubic ground state")
    dimer_repulsive: bool = Field(True, description="no dimer with a spurious short-range well; each repulsive at the check distance")
    vacancy_positive: bool = Field(True, description="a positive vacancy formation energy")
    md_stable: bool = Field(True, description="hot MD and quench: no fused pair, no NaN, no temperature blow-up")
    md_max_drift_mev_per_atom_ps: Tolerance = Field(
        False, description="NVE energy drift, |meV/atom/ps|; false: reported only")

    @field_validator("a0_tolerance", "b0_tolerance", "md_max_drift_mev_per_atom_ps", mode="before")
    @classmethod
    def _false_is_off(cls, value: Any) -> Any:
        if value is None or value is False:
            return False
        if value is True or (isinstance(value, (int, float)) and not value > 0):
            raise ValueError(f"must be a tolerance above 0, or false to turn this gate off; got {value!r}")
        return value


class ValidationConfig(_Strict):
    """How a generation is validated before it is published (``validate/``)."""

    enabled: bool = Field(True, description="validate before publishing; false publishes after evaluation")
    eos_volume_range: float = Field(0.10, gt=0, lt=0.5, description="EOS volumes within +- this fraction of V0")
    eos_points: int = Field(11, ge=5, le=101)
    eos_reference: list[str] = Field(
        list(EOS_REFERENCE_PATTERNS), description="config_type patterns of DFT energy-volume sets (fnmatch)")
    elastic_strain: float = Field(0.01, gt=0, le=0.05, description="largest finite strain for C11, C12, C44")
    dimer_min_distance: float = Field(0.5, gt=0, description="dimer curves from here to the ACE cutoff, Angstrom")
    dimer_step: float = Field(0.05, gt=0, le=0.5, description="Angstrom")
    dimer_check_distance: float | None = Field(
        None, gt=0, description="energy checked here, Angstrom; None: min(1.0, half the sum of covalent radii)")
    dimer_min_energy_ev: float = Field(0.0, description="the dimer energy at the check distance, above the free atoms")
    dimer_well_fraction: float = Field(
        0.6, gt=0, lt=2, description="the first minimum of a dimer no closer than this fraction of the covalent-radius sum")
    supercell_atoms: int = Field(100, ge=8, le=5000, description="vacancy and MD supercells: at least this many atoms")
    md_temperature_k: float | None = Field(
        None, gt=0, description="hot NVT temperature; None: twice the melting estimate, k_B T_m = 0.011 B0 V0")
    md_steps: int = Field(500, ge=10, description="hot NVT (Langevin) steps: 0.5 ps melts a cell at twice T_m")
    md_nve_steps: int = Field(100, ge=10, description="NVE steps after the hot run, for the energy drift")
    md_quench_steps: int = Field(200, ge=1, description="quench: at most this many FIRE steps")
    md_timestep_fs: float = Field(1.0, gt=0, le=5)
    md_fused_fraction: float = Field(
        0.5, gt=0, lt=1, description="a pair closer than this fraction of its covalent-radius sum is fused")
    md_blowup_factor: float = Field(3.0, gt=1, description="a temperature above this times the target is a blow-up")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    gates: ValidationGates = ValidationGates()
