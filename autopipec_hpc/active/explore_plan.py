"""What an exploration is asked (``explore --plan explore.yaml``): the typed ``ExplorePlan``.

Every value is checked when the plan is read, before any database is opened or job
submitted: unknown keys are refused by name, inf and NaN everywhere, and the trust
levels, steps, temperatures and pressures by their range. ``plan_template()`` is the
commented plan ``plan-template`` prints; it runs as is on the demo data.

The plan's trajectories are the grid: every starting structure x every ensemble's
temperatures (x its pressures, NPT), numbered in that order (the trajectory id).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator

from autopipec_hpc.config import _Strict, load_model
from autopipec_hpc.states import StructureStatus


class Ensemble(StrEnum):
    """How a trajectory is integrated (``active/explore.py``)."""

    NVT = "nvt"  # ase.md.langevin.Langevin
    NPT = "npt"  # ase.md.nptberendsen.NPTBerendsen


class Starts(_Strict):
    """Where the trajectories start: database rows (by ``config_type`` and status) and/or
    files, ``count`` of them drawn with ``seed``, each repeated to ``min_atoms`` at least."""

    config_types: list[str] = Field(default_factory=list,
                                    description="rows of these config_types (empty: any config_type)")
    status: str = Field(StructureStatus.TRAINING_READY.value, description="rows of this status")
    files: list[Path] = Field(default_factory=list, description="ASE-readable files whose frames also start")
    use_database: bool = Field(True, description="draw from the database's rows (false: the files only)")
    count: int = Field(4, ge=1, le=100_000, description="starting structures drawn")
    seed: int = Field(0, ge=0)
    min_atoms: int = Field(32, ge=1, le=100_000, description="supercells repeated until this many atoms")


class EnsembleGrid(_Strict):
    """One ensemble and its grid of temperatures (and pressures, NPT only)."""

    ensemble: Ensemble
    temperatures_K: list[float] = Field(min_length=1)
    pressures_GPa: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _grid(self) -> "EnsembleGrid":
        for t in self.temperatures_K:
            if not 0 < t <= 100_000:
                raise ValueError(f"temperatures_K: {t} is not a temperature (0 < T <= 100000 K)")
        for p in self.pressures_GPa:
            if not -100 <= p <= 10_000:
                raise ValueError(f"pressures_GPa: {p} is out of range (-100 to 10000 GPa)")
        if self.ensemble == Ensemble.NPT and not self.pressures_GPa:
            raise ValueError("pressures_GPa: an npt ensemble needs at least one pressure")
        if self.ensemble == Ensemble.NVT and self.pressures_GPa:
            raise ValueError("pressures_GPa: an nvt ensemble holds its volume; give pressures to npt")
        return self

    def points(self) -> list[tuple[float, float | None]]:
        """(temperature, pressure) of each trajectory of this grid, in order."""
        if self.ensemble == Ensemble.NVT:
            return [(t, None) for t in self.temperatures_K]
        return [(t, p) for t in self.temperatures_K for p in self.pressures_GPa]


class ExplorePlan(_Strict):
    """An exploration: where trajectories start, how they run, and what is kept."""

    starts: Starts = Field(default_factory=Starts)
    ensembles: list[EnsembleGrid] = Field(min_length=1)
    steps: int = Field(ge=1, le=10_000_000, description="MD steps per trajectory at most")
    timestep_fs: float = Field(2.0, gt=0, le=20)
    friction_per_fs: float = Field(0.02, gt=0, le=10, description="Langevin friction")
    taut_fs: float = Field(100.0, gt=0, description="NPT: Berendsen thermostat time")
    taup_fs: float = Field(1000.0, gt=0, description="NPT: Berendsen barostat time")
    compressibility_per_GPa: float = Field(0.01, gt=0, le=10, description="NPT: the barostat's compressibility")
    check_every: int = Field(10, ge=1, description="steps between two gamma checks")
    gamma_lo: float = Field(2.0, gt=0, description="frames above this max gamma are candidates")
    gamma_hi: float = Field(10.0, gt=0, description="a trajectory stops above this max gamma")
    max_frames: int = Field(5, ge=1, description="candidates kept per trajectory at most")
    min_distance_A: float = Field(1.5, gt=0, description="a pair closer than this: collision, trajectory stops")
    max_temperature_factor: float = Field(3.0, gt=1, description="stop once T exceeds this times its target")
    min_volume_per_atom_A3: float = Field(5.0, gt=0, description="a box smaller than this per atom: collapsed")
    max_volume_per_atom_A3: float = Field(60.0, gt=0, description="a box larger than this per atom: exploded")
    min_cell_angle_deg: float = Field(30.0, gt=0, lt=90, description="a cell angle outside [this, 180-this]: skewed")
    trajectories_per_task: int = Field(4, ge=1, description="trajectories run one after another in one task")
    max_parallel: int | None = Field(None, ge=1, description="SLURM: tasks of the array running at once")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _levels(self) -> "ExplorePlan":
        if self.gamma_hi <= self.gamma_lo:
            raise ValueError(f"gamma_hi ({self.gamma_hi:g}) must be above gamma_lo ({self.gamma_lo:g})")
        if self.max_volume_per_atom_A3 <= self.min_volume_per_atom_A3:
            raise ValueError("max_volume_per_atom_A3 must be above min_volume_per_atom_A3")
        if not self.starts.use_database and not self.starts.files:
            raise ValueError("starts: use_database is false and no files are given: nothing to start from")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExplorePlan":
        return load_model(cls, path)

    def grid(self) -> list[tuple[Ensemble, float, float | None]]:
        """(ensemble, T, P) of each trajectory of one starting structure, in order."""
        return [(g.ensemble, t, p) for g in self.ensembles for t, p in g.points()]


def plan_template() -> str:
    """A commented plan that runs as is on the demo data (``example-data``)."""
    return """\
# An exploration plan: `autopipec-hpc explore --generation N --plan explore.yaml`,
# or `autopipec-hpc loop --plan explore.yaml ...`. Unknown keys are refused.
starts:
  config_types: [fcc_rattled, fcc_strained]  # database rows of these config_types ([] : any)
  status: TRAINING_READY   # ... and of this status
  files: []                # ASE-readable files whose frames start trajectories too
  count: 3                 # starting structures drawn (with seed) from the rows and files
  seed: 0
  min_atoms: 32            # each start repeated into a supercell of at least this many atoms
ensembles:                 # trajectories: every start x every point of every grid
  - ensemble: nvt          # Langevin thermostat
    temperatures_K: [300, 900, 1500]
  - ensemble: npt          # Berendsen thermostat and isotropic barostat
    temperatures_K: [600]
    pressures_GPa: [0, 10]
steps: 200                 # MD steps per trajectory at most
timestep_fs: 2.0
friction_per_fs: 0.02      # nvt
taut_fs: 100               # npt: thermostat time
taup_fs: 1000              # npt: barostat time
compressibility_per_GPa: 0.01
check_every: 10            # steps between two extrapolation-grade (gamma) checks
gamma_lo: 2.0              # frames with gamma_lo < max gamma < gamma_hi become candidates
gamma_hi: 10.0             # beyond it a trajectory stops: its frames are noise
max_frames: 5              # candidates kept per trajectory at most
min_distance_A: 1.5        # a closer pair is a collision: the trajectory stops
max_temperature_factor: 3  # T above 3x its target: a blow-up, the trajectory stops
min_volume_per_atom_A3: 5  # boxes outside these bounds, or with a cell angle outside
max_volume_per_atom_A3: 60 # [min_cell_angle_deg, 180 - min_cell_angle_deg], are not physical
min_cell_angle_deg: 30
trajectories_per_task: 4   # one scheduler task (one array task on SLURM) runs these in turn
max_parallel: null         # SLURM: array tasks running at once (null: no limit)
seed: 0
"""
