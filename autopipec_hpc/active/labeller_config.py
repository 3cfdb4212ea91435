"""``labeller.yaml``: which ASE calculator labels, with which settings, and how its jobs run.

Typed and strict (unknown keys refused by name) like the site and train configs: a typo in
a DFT setting would otherwise cost a whole labelling job array. The ``name`` is the level
of theory: every row it labels carries it, with the calculator's code, version and a hash
of its settings (``provenance``), so a training set that mixes levels can be refused.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from autopipec_hpc.config import _Strict, load_model
from autopipec_hpc.errors import ConfigError, LabellingError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_LEVEL = re.compile(r"^[A-Za-z0-9_.:+=-]+$")


class LabellerConfig(_Strict):
    """One labeller: an ASE calculator and how its label job array runs."""

    name: str = Field(description="the level of theory, e.g. gpaw-pbe-pw200-gamma (stored on every row)")
    calculator: str = Field(description="MODULE:CLASS of an ASE calculator, e.g. gpaw:GPAW")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the calculator's keyword arguments")
    setup: list[str] = Field(default_factory=list,
                             description="shell lines run on the compute node before the task (SLURM)")
    time_limit_s: float = Field(1800.0, gt=0, description="per structure; a structure over it fails as a timeout")
    retries: int = Field(1, ge=0, description="more tries of a structure that timed out, each with twice the time")
    structures_per_task: int = Field(4, ge=1, description="structures one array task labels, one after another")
    max_parallel: int | None = Field(None, ge=1, description="array tasks running at once (SLURM %N)")
    max_failed_fraction: float = Field(0.05, ge=0, le=1,
                                       description="the loop trains on when at most this fraction failed")
    stress: bool = Field(False, description="store the stress too, where the calculator computes it")
    max_net_force: float = Field(0.1, ge=0, description="eV/A: |sum of forces| of a periodic cell above it fails")
    max_displacement: float = Field(1e-3, ge=0, description="A: a calculator that moved atoms further is refused")
    energy_window: float | None = Field(
        None, gt=0, description="eV/atom: a label this far from the selecting generation's prediction, on a "
        "structure it was confident about (gamma_max <= confident_gamma), is refused as suspicious")
    confident_gamma: float = Field(1.0, gt=0, description="with energy_window: the gamma_max below which it applies")

    @field_validator("calculator")
    @classmethod
    def _spec(cls, value: str) -> str:
        if not _SPEC.match(value):
            raise ValueError(f"expected MODULE:CLASS, e.g. ase.calculators.emt:EMT, got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _level(cls, value: str) -> str:
        if not _LEVEL.match(value):
            raise ValueError(f"{value!r} may only hold letters, digits and _.:+=-")
        return value

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, value: list[str]) -> list[str]:
        for line in value:
            if "\n" in line or "\r" in line:
                raise ValueError(f"each setup entry must be one line, got {line!r}")
        return value

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LabellerConfig":
        config = load_model(cls, path)
        config.check_calculator(where=str(path))
        return config

    @classmethod
    def shortcut(cls, spec: str, kwargs: dict[str, Any] | None = None) -> "LabellerConfig":
        """``--calculator MODULE:CLASS``: a labeller named after its calculator, default settings."""
        try:
            config = cls(name=spec.replace(":", "."), calculator=spec, kwargs=kwargs or {})
        except Exception as exc:
            raise LabellingError(f"--calculator {spec!r}: expected MODULE:CLASS, e.g. ase.calculators.emt:EMT"
                                 ) from exc
        config.check_calculator(where="--calculator")
        return config

    # -- the calculator -------------------------------------------------------------------
    def calculator_class(self, where: str = "labeller") -> Any:
        module_name, _, class_name = self.calculator.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or whatever the module raises on import
            raise LabellingError(f"{where}: calculator {self.calculator!r}: cannot import {module_name!r} "
                                 f"({' '.join(str(exc).split())})") from None
        cls = getattr(module, class_name, None)
        if not callable(cls):  # a class, or a factory such as gpaw.GPAW
            raise LabellingError(f"{where}: calculator {self.calculator!r}: {module_name} has no class "
                                 f"{class_name!r}")
        return cls

    def make_calculator(self, where: str = "labeller") -> Any:
        cls = self.calculator_class(where)
        try:
            return cls(**self.kwargs)
        except Exception as exc:
            raise LabellingError(f"{where}: calculator {self.calculator} refused its kwargs "
                                 f"{json.dumps(self.kwargs, default=str)}: {' '.join(str(exc).split())}") from None

    def check_calculator(self, where: str = "labeller") -> None:
        """Import the class and make one with the kwargs (cheap: no calculation), so a bad
        labeller is named before any job is submitted."""
        self.make_calculator(where)

    # -- provenance -----------------------------------------------------------------------
    @property
    def settings_hash(self) -> str:
        """What decides the numbers (calculator and kwargs), not how the jobs run."""
        text = json.dumps({"calculator": self.calculator, "kwargs": self.kwargs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def level(self) -> str:
        """The level of theory a row is labelled at: ``name#settings_hash``."""
        return f"{self.name}#{self.settings_hash}"

    def provenance(self) -> dict[str, Any]:
        """The key-value pairs every labelled row gets."""
        package = self.calculator.partition(":")[0].split(".")[0]
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = str(getattr(importlib.import_module(package), "__version__", "unknown"))
        return {"labeller": self.name, "labeller_code": package, "labeller_version": version,
                "labeller_hash": self.settings_hash, "labelled_by": self.calculator}


def load_labeller(path: str | Path | None, calculator: str | None, kwargs_json: str | None = None
                  ) -> LabellerConfig:
    """``--labeller FILE`` or the ``--calculator MODULE:CLASS [--kwargs JSON]`` shortcut."""
    if path is not None and calculator is not None:
        raise ConfigError("give --labeller or --calculator, not both")
    if path is not None:
        return LabellerConfig.from_yaml(path)
    if calculator is None:
        raise ConfigError("label: give --labeller labeller.yaml (see labeller-template) or --calculator MODULE:CLASS")
    return LabellerConfig.shortcut(calculator, parse_kwargs(kwargs_json))


def parse_kwargs(kwargs_json: str | None) -> dict[str, Any]:
    """``--kwargs``: a calculator's keyword arguments as a JSON object ({} when absent)."""
    if not kwargs_json:
        return {}
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise LabellingError(f"--kwargs is not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise LabellingError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    return kwargs


GPAW_TEMPLATE = """\
# labeller.yaml: GPAW (pip install -e ".[dft]", see README "Installing"), PBE, plane waves.
# Runs as is: a Gamma-point, 200 eV setting for small Al cells. Raise ecut and kpts for production.
name: gpaw-pbe-pw200-gamma       # the level of theory, stored on every labelled row
calculator: gpaw:GPAW
kwargs:
  mode: {name: pw, ecut: 200}
  xc: PBE
  kpts: {size: [1, 1, 1], gamma: true}
  occupations: {name: fermi-dirac, width: 0.1}
  convergence: {energy: 1.0e-5}
  maxiter: 100                   # an SCF that needs more fails as KohnShamConvergenceError
  txt: null                      # GPAW's own log; a path keeps it
setup: []                        # e.g. ["module load gpaw", "export OMP_NUM_THREADS=1"]
time_limit_s: 600                # per structure
retries: 1                       # a structure that timed out is tried once more with twice the time
structures_per_task: 4
max_failed_fraction: 0.05        # the loop trains on if at most 5 % failed
"""

GENERIC_TEMPLATE = """\
# labeller.yaml: any ASE calculator. Examples:
#   VASP:  calculator: ase.calculators.vasp:Vasp
#          kwargs: {xc: PBE, encut: 520, kpts: [4, 4, 4], ismear: 0, sigma: 0.05, ibrion: -1, nsw: 0}
#          setup: ["module load vasp", "export ASE_VASP_COMMAND='srun vasp_std'", "export VASP_PP_PATH=$HOME/pp"]
#          (ibrion -1 / nsw 0: a relaxation would move the atoms, and such a label is refused)
#   Quantum ESPRESSO: calculator: ase.calculators.espresso:Espresso
#          kwargs: {input_data: {system: {ecutwfc: 60}}, pseudopotentials: {Cu: Cu.pbe.UPF}, kpts: [4, 4, 4]}
#          setup: ["module load qe", "export ASE_ESPRESSO_COMMAND='srun pw.x -in PREFIX.pwi > PREFIX.pwo'"]
name: emt                         # the level of theory, stored on every labelled row
calculator: ase.calculators.emt:EMT
kwargs: {}
setup: []
time_limit_s: 1800
retries: 1
structures_per_task: 4
max_failed_fraction: 0.05
"""


def labeller_template(gpaw: bool = False) -> str:
    return GPAW_TEMPLATE if gpaw else GENERIC_TEMPLATE
