"""Typed settings: what to train (TrainConfig) and where to run it (SiteConfig).

Both load from YAML and refuse unknown keys by name, because pacemaker itself
silently ignores keys it does not know and a typo must not cost a day of GPU
time.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from ase.data import chemical_symbols
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autopipec_hpc.errors import ConfigError
from autopipec_hpc.splits import FixedHoldout
from autopipec_hpc.validate.settings import ValidationConfig

# Radial and angular budgets per body order (pacemaker's own UNARY defaults);
# max_degree = body order - 1 selects how many of them are used.
NRADMAX_BY_ORDERS = [15, 6, 4, 3, 2, 2]
LMAX_BY_ORDERS = [0, 3, 3, 2, 2, 1]

# python-ace issue #39: `pacemaker -p parent.yaml` with fit.ladder_step set throws the parent's
# coefficients away and grows the ladder from an empty potential.
LADDER_WARM_START = (
    "ladder_step cannot be combined with a warm start (warm_start): pacemaker would start the ladder "
    "from an empty potential, not the parent's (python-ace issue #39); unset one of them"
)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PATH = re.compile(r"^[A-Za-z0-9_./~+-]+$")


class _Strict(BaseModel):
    # inf and NaN pass Python's comparisons in surprising ways and end up in
    # pacemaker's input as `rcut: inf`: refuse them everywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainConfig(_Strict):
    """Training settings; ``pacemaker_wrapper.render_input`` maps them onto pacemaker's input."""

    cutoff: float = Field(5.0, gt=0, description="ACE radial cutoff rcut, Angstrom")
    # A small production basis: 100 functions per element up to body order 5
    # (464 parameters for one element). Sized for pacemaker's `tensorpot`
    # evaluator; `pyace` has no analytic gradient and suits only tiny fits.
    b_basis_size: int = Field(100, ge=1, description="functions per element")
    max_degree: int = Field(4, ge=1, le=len(NRADMAX_BY_ORDERS), description="body order - 1")
    # pacemaker's loss is (1-kappa) * sum w_E dE^2 + kappa * sum w_F dF^2 with the weights
    # normalised per structure and per atom: the 3N force components need no extra factor.
    # Default kappa 0.3 (pacemaker's advice); kappa 0.99 (the old weights 1 / 100) gave
    # 3-5x the holdout energy RMSE on DFT copper (issue 19, bench/bench_kappa.py).
    energy_weight: float = Field(
        0.7, ge=0, description="energy share of the loss; kappa = force_weight / (energy_weight + force_weight)"
    )
    force_weight: float = Field(
        0.3, ge=0, description="force share of the loss; kappa = force_weight / (energy_weight + force_weight)"
    )
    l1_coeffs: float = Field(1e-8, ge=0, description="L1 regularization")
    l2_coeffs: float = Field(1e-8, ge=0, description="L2 regularization")
    maxiter: int = Field(500, ge=1)
    # Early stopping is pacemaker's own (fit.min_relative_test_loss_per_iter and
    # fit.early_stopping_patience): it watches the loss on the dataset's test split, so it acts
    # only where test_fraction > 0. A warm start begins near its optimum and would otherwise
    # run all of maxiter (issue 19: warm generations took 2-3x the cold one).
    early_stopping_min_improvement: float | None = Field(
        1e-3, gt=0, lt=1, description="the fit stops once no stretch of early_stopping_patience iterations "
        "lowered the test loss by more than this fraction per iteration; None runs all of maxiter",
    )
    early_stopping_patience: int = Field(
        50, ge=1, description="iterations the test loss may go without that improvement before the fit stops"
    )
    # A warm start begins near its optimum, but early stopping alone ends it late: the loss
    # it watches, on a test split of a few structures, is noisy enough to keep resetting the
    # patience window (bench_warm_start: 190 of 500 iterations, its best test loss at 60).
    # A count, not a share of maxiter, as DP-GEN's training_reuse_numb_steps: BFGS restarts
    # from an identity Hessian, and 45 iterations (0.3 of a loop's 150) left each warm
    # generation 2.5x the cold fit's energy error (bench_active_learning).
    warm_start_maxiter: int | None = Field(
        150, ge=1, description="a warm-started fit runs at most this many iterations (or maxiter, if fewer; "
        "early stopping still applies); None runs all of maxiter",
    )
    optimizer: Literal["BFGS", "L-BFGS-B"] = "BFGS"
    batch_size: int = Field(100, ge=1, description="structures per TensorFlow batch: a memory knob")
    batch_size_reduction: bool = Field(
        True, description="halve batch_size and retry when the GPU runs out of memory"
    )
    ladder_step: int | float | None = Field(
        None, description="hierarchical basis extension: functions added per step (int >= 1) "
        "or a fraction of the current basis (0 < float < 1); None fits the whole basis at once",
    )
    ladder_type: Literal["body_order", "power_order"] = "body_order"
    fit_cycles: int = Field(1, ge=1, description="repeated fits from perturbed coefficients; the best is kept")
    noise_relative_sigma: float | None = Field(
        None, ge=0, description="relative noise added to coefficients between fit cycles"
    )
    seed: int = Field(42, ge=0, le=2**32 - 1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    zbl_inner: float = Field(1.0, gt=0, description="LAMMPS pair_style zbl inner cutoff")
    zbl_outer: float = Field(2.0, gt=0, description="LAMMPS pair_style zbl outer cutoff")
    reference_energies: dict[str, float] | None = Field(
        None, description="isolated-atom energies per element; fitted by least squares if absent"
    )
    max_energy_rmse_mev: float = Field(1000.0, gt=0, description="divergence threshold, meV/atom")
    max_force_rmse_mev: float = Field(10000.0, gt=0, description="divergence threshold, meV/A")
    timeout_hours: float = Field(24.0, gt=0)
    warm_start: int | None = Field(
        None, ge=1, description="start pacemaker from this published generation's potential (warm_start.py)"
    )
    level_of_theory: str | None = Field(
        None, description="train only on rows labelled at this level (a labeller name, or NAME#HASH); "
        "needed when the labelled rows mix levels (levels.py); rows imported with labels record none",
    )
    holdout: FixedHoldout | None = Field(
        None, description="a fixed holdout, test in every generation and compared on: {config_type: NAME or "
        "[NAMES]} and/or {file: EXTXYZ} (structures of the database with that content; splits.py)",
    )
    validation: ValidationConfig = Field(
        ValidationConfig(), description="properties, hot MD and the gate before publication (validate/)")

    @property
    def warm_start_budget(self) -> int:
        """pacemaker's maxiter for a fit begun from a parent's potential."""
        return self.maxiter if self.warm_start_maxiter is None else min(self.maxiter, self.warm_start_maxiter)

    @model_validator(mode="before")
    @classmethod
    def _kappa_key(cls, data: Any) -> Any:
        # `kappa: K` is pacemaker's own spelling of the balance: K = force_weight / (energy_weight
        # + force_weight). It is turned into weights 1-K, K here and not stored.
        if not isinstance(data, dict) or "kappa" not in data:
            return data
        given = sorted(k for k in ("energy_weight", "force_weight") if k in data)
        if given:
            raise ValueError(f"give either kappa or {' and '.join(given)}, not both")
        kappa = data["kappa"]
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 < kappa < 1:
            raise ValueError(f"kappa must be a number between 0 and 1 (exclusive), got {kappa!r}")
        rest = {k: v for k, v in data.items() if k != "kappa"}
        return {**rest, "energy_weight": 1.0 - float(kappa), "force_weight": float(kappa)}

    @field_validator("reference_energies")
    @classmethod
    def _known_elements(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            unknown = sorted(k for k in value if k not in chemical_symbols[1:])
            if unknown:
                raise ValueError(f"not chemical elements: {', '.join(map(repr, unknown))}")
        return value

    @field_validator("ladder_step", mode="before")
    @classmethod
    def _ladder_step(cls, value: Any) -> int | float | None:
        # Checked before pydantic's coercion, which would read `true` as 1.
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, float) and math.isfinite(value):
            if 0 < value < 1:
                return value
            if value >= 1 and value.is_integer():
                return int(value)
        raise ValueError(f"must be an integer >= 1 or a fraction between 0 and 1, got {value!r}")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.zbl_inner >= self.zbl_outer:
            raise ValueError(f"zbl_inner ({self.zbl_inner}) must be smaller than zbl_outer ({self.zbl_outer})")
        if self.energy_weight + self.force_weight == 0:
            raise ValueError("energy_weight and force_weight cannot both be 0")
        if self.warm_start is not None and self.ladder_step is not None:
            raise ValueError(LADDER_WARM_START)
        return self

    @property
    def kappa(self) -> float:
        """pacemaker's ``fit.loss.kappa``, the force share of the loss: loss = (1-k) E-term + k F-term,
        k = force_weight / (energy_weight + force_weight); 0.3 by default. A ``kappa`` key in the
        settings sets the weights to 1-kappa and kappa."""
        return self.force_weight / (self.energy_weight + self.force_weight)

    @property
    def nradmax_by_orders(self) -> list[int]:
        return NRADMAX_BY_ORDERS[: self.max_degree]

    @property
    def lmax_by_orders(self) -> list[int]:
        return LMAX_BY_ORDERS[: self.max_degree]

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> "TrainConfig":
        return load_model(cls, path)


class JobResources(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: int = Field(0, ge=0)
    cpus: int = Field(1, ge=1)
    # SLURM reads --mem=0 as "all of the node's memory": keep a real minimum.
    mem_gb: float = Field(4.0, ge=0.5, description="memory per job, GB (SLURM --mem; at least 0.5)")
    time_minutes: int = Field(60, ge=1)

    @field_validator("partition", "account", "qos")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r} may only hold letters, digits, '_', '.' and '-'")
        return value


class Evaluator(StrEnum):
    """pacemaker's backend. AUTO: tensorpot where pacemaker's environment imports
    tensorpotential (TensorFlow), else pyace; resolved before submission."""

    AUTO = "auto"
    TENSORPOT = "tensorpot"
    PYACE = "pyace"


class PacemakerSetup(_Strict):
    command: str = Field("pacemaker", description="pacemaker executable on the compute node")
    evaluator: Evaluator = Evaluator.AUTO
    allow_cpu_fallback: bool = Field(
        False, description="train on the CPU when a GPU job's TensorFlow sees no GPU (else the job fails at once)"
    )

    @field_validator("command")
    @classmethod
    def _no_shell(cls, value: str) -> str:
        if not value or any(ch in value for ch in "\n;&|`$<>'\"\\") or " " in value.strip():
            raise ValueError(f"pacemaker command must be one executable path or name, got {value!r}")
        return value.strip()


class SiteConfig(_Strict):
    """Where and how the pipeline runs: one small YAML file per site."""

    # `validate:` in YAML is the field `validate_job` (pydantic's BaseModel has a `validate`);
    # run.json written by field name reads back too.
    model_config = ConfigDict(**{**_Strict.model_config, "populate_by_name": True, "serialize_by_alias": True})

    name: str = "local"
    scheduler: Literal["local", "slurm"] = "local"
    work_dir: Path = Path("runs")
    output_dir: Path = Path("output")
    database: str = "output/structures.db"
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job")
    python: str | None = Field(
        None, description="python of the compute-node environment (default: the one running autopipec-hpc)"
    )
    pacemaker: PacemakerSetup = PacemakerSetup()
    train: JobResources = JobResources()
    evaluate: JobResources = JobResources()
    select: JobResources | None = Field(
        None, description="the `select` job (scoring candidates); default: the evaluate job's resources"
    )
    # The active-learning jobs beyond select; each defaults to the evaluation's resources.
    explore: JobResources | None = Field(
        None, description="each task of an exploration job array (MD on a potential); default: evaluate's"
    )
    label: JobResources | None = Field(
        None, description="each task of a labelling job array (DFT); default: evaluate's"
    )
    validate_job: JobResources | None = Field(
        None, alias="validate",
        description="the validation job after the evaluation (properties, MD stability); default: evaluate's",
    )
    max_restarts: int = Field(2, ge=0, description="requeues after a time limit or preemption")
    signal_delay_s: int = Field(60, ge=5, description="SIGUSR2 this long before the time limit")
    result_timeout_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="how long `submit --wait` waits for a result"
    )

    @field_validator("work_dir", "output_dir")
    @classmethod
    def _safe_path(cls, value: Path) -> Path:
        # These paths are written into job scripts: no characters a shell would act on.
        if not _PATH.match(str(value)):
            raise ValueError(f"path {str(value)!r} may only hold letters, digits, '_', '.', '-', '/' and '~'")
        # '~' means the home folder, as in a shell; never a folder literally named '~'.
        return value.expanduser()

    @field_validator("database")
    @classmethod
    def _home_in_database_path(cls, value: str) -> str:
        # '~' in a path means the home folder, as in work_dir; a URL is the server's business.
        return value if "://" in value else str(Path(value).expanduser())

    @field_validator("name")
    @classmethod
    def _safe_site_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"site name {value!r} may only hold letters, digits, '_', '.' and '-'")
        return value

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, value: list[str]) -> list[str]:
        for line in value:
            if "\n" in line or "\r" in line or "\0" in line:
                raise ValueError(f"setup line {line!r} must be a single line")
        return value

    @field_validator("python")
    @classmethod
    def _python_path(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(ch in value for ch in "\n;&|`$<>'\" \\")):
            raise ValueError(f"python must be one executable path or name, got {value!r}")
        return value

    @property
    def python_executable(self) -> str:
        return self.python or sys.executable

    @property
    def select_resources(self) -> JobResources:
        """What a `select` job asks for: its own section, else the evaluation's (both read a
        potential and score structures on CPUs)."""
        return self.select or self.evaluate

    def resources(self, role: str) -> JobResources:
        """What a job of ``role`` asks for: its own section, else the evaluation's."""
        own = {"train": self.train, "evaluate": self.evaluate, "select": self.select,
               "explore": self.explore, "label": self.label, "validate": self.validate_job}[str(role)]
        return own or self.evaluate

    def job_resources(self) -> dict[str, JobResources]:
        """Every job this site submits, by role, with the resources it asks for."""
        return {role: self.resources(role) for role in ("train", "evaluate", "select", "explore", "label", "validate")}

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> "SiteConfig":
        return load_model(cls, path)


def resolve_command(name: str) -> str:
    """``name`` on PATH, else beside the running interpreter (an un-activated venv)."""
    found = shutil.which(name)
    if found:
        return found
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else name


def load_model(cls: type[_Strict], path: str | Path | None):
    """Build ``cls`` from a YAML file (defaults when ``path`` is None); errors name the key."""
    if path is None:
        return cls()
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a settings file") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML ({reason})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a settings file") from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {' '.join(str(err['msg']).split())}")
    return "; ".join(parts)
