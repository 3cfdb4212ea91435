"""Checks on the login node before anything is submitted.

Each check names itself in its error; a failed check submits nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import yaml

from autopipec_hpc import registry
from autopipec_hpc.config import Evaluator, SiteConfig
from autopipec_hpc.dataset_prep import DatasetManifest
from autopipec_hpc.errors import ConfigError, PreflightError, SchedulerError, TrainingFailedError, one_line
from autopipec_hpc.run_folder import RunSpec
from autopipec_hpc.scheduler.base import Scheduler
from autopipec_hpc.pacemaker.environment import BackendInfo, pacemaker_python, probe_backend
from autopipec_hpc.warm_start import Parent, stage_parent_potential

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 120


def pacemaker_interpreter(command: str) -> str:
    """The interpreter of pacemaker's environment, or a PreflightError naming the command."""
    interpreter = pacemaker_python(command)
    if interpreter is None:
        raise PreflightError(
            f"check 'pacemaker command': {command!r} is not a Python console script here"
        )
    return interpreter


def _run_in_site_env(spec: RunSpec, argv: list[str], check: str) -> None:
    """Run ``argv`` after the site's setup lines, as a compute node would."""
    setup = spec.site.setup
    script = "\n".join([*setup, " ".join(shlex.quote(a) for a in argv)])
    try:
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PreflightError(f"check '{check}': no answer within {CHECK_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise PreflightError(f"check '{check}' failed:\n{tail}")


def check_pacemaker(spec: RunSpec) -> tuple[str, BackendInfo]:
    command = spec.site.pacemaker.command
    interpreter = pacemaker_interpreter(command)
    _run_in_site_env(spec, [interpreter, "-c", "import pyace"], "pacemaker command")
    try:
        backend = probe_backend(command, setup=spec.site.setup, timeout_s=CHECK_TIMEOUT_S)
    except TrainingFailedError as exc:
        raise PreflightError(f"check 'pacemaker command': {exc}") from None
    return interpreter, backend


def resolve_evaluator(wanted: Evaluator, backend: BackendInfo, interpreter: str) -> Evaluator:
    """AUTO becomes tensorpot where pacemaker's environment has TensorFlow and
    tensorpotential, else pyace; an explicit tensorpot without them is refused."""
    if wanted == Evaluator.AUTO:
        return Evaluator.TENSORPOT if backend.tensorpot_importable else Evaluator.PYACE
    if wanted == Evaluator.TENSORPOT and not backend.tensorpot_importable:
        raise PreflightError(
            f"check 'pacemaker evaluator': the site asks for tensorpot, but pacemaker's environment "
            f"({interpreter}) cannot import tensorflow and tensorpotential; install the train-cpu or "
            "train-gpu extra there (README: Installing), or set pacemaker.evaluator: pyace for tiny fits"
        )
    return wanted


@dataclass(frozen=True)
class LocalEvaluator:
    """The evaluator pacemaker's environment on this machine would get, and what it has."""

    evaluator: Evaluator
    backend: BackendInfo | None  # None: the environment could not be inspected here
    problem: str | None = None  # why not


def local_evaluator(site: SiteConfig) -> LocalEvaluator:
    """Probe pacemaker's environment here and resolve the site's evaluator with it. An
    environment that cannot be inspected keeps the site's word (the preflight of a
    submission names the problem); an explicit tensorpot without TensorFlow is refused."""
    command = site.pacemaker.command
    try:
        backend = probe_backend(command)
    except TrainingFailedError as exc:
        return LocalEvaluator(site.pacemaker.evaluator, None, str(exc))
    return LocalEvaluator(resolve_evaluator(site.pacemaker.evaluator, backend, command), backend)


def check_parent_potential(parent: Parent) -> str:
    """The parent's potential.yaml as a warm start stages it, read and checked before the
    generation is claimed: a garbage or truncated file found only after the claim left a
    FAILED record and a run folder. ConfigError naming the file."""
    source = parent.folder / registry.POTENTIAL_YAML
    with tempfile.TemporaryDirectory(prefix="autopipec-warm-start-") as tmp:
        staged = Path(tmp) / registry.POTENTIAL_YAML
        try:
            stage_parent_potential(parent, staged)
            if not isinstance(yaml.safe_load(staged.read_text()).get("species"), list):
                raise ValueError("no list of species")
            if find_spec("pyace") is not None:  # pacemaker's own reader, where this side has it
                from pyace import BBasisConfiguration

                BBasisConfiguration(str(staged))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ValueError,
                RuntimeError) as exc:
            raise ConfigError(f"warm_start: generation {parent.generation}'s {source} is not a readable "
                              f"potential ({one_line(exc)[:160]})") from None
        return staged.read_text()


def check_dataset_readable(spec: RunSpec, manifest: DatasetManifest, interpreter: str) -> None:
    files = [str(p) for p in manifest.train_paths + manifest.test_paths]
    code = (
        "import sys, pandas as pd\n"
        "for f in sys.argv[1:]:\n"
        "    df = pd.read_pickle(f, compression='gzip')\n"
        "    assert {'ase_atoms', 'energy_corrected', 'forces'} <= set(df.columns), f\n"
    )
    _run_in_site_env(spec, [interpreter, "-c", code, *files], "dataset readable by pacemaker's environment")


def check_database(spec: RunSpec) -> None:
    code = "import sys, ase.db, autopipec_hpc; ase.db.connect(sys.argv[1], append=True).count()"
    _run_in_site_env(spec, [spec.site.python_executable, "-c", code, spec.database],
                     "database reachable from the compute-node environment")


def check_scheduler(scheduler: Scheduler) -> list[str]:
    """The scheduler's own check (SLURM: sbatch exists, sacct answers, partitions exist)."""
    try:
        return scheduler.check()
    except SchedulerError as exc:
        raise PreflightError(f"check '{scheduler.check_name}': {exc}") from None


def check_writable(spec: RunSpec) -> None:
    """The output folder (where the potential is published) and the run folder must
    take files now, before a training is spent on them."""
    for what, folder in (("output folder", registry.potentials_root(spec.output_dir)), ("run folder", spec.path)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".autopipec-check-") as probe:
                probe.write(b"\0" * 65536)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            raise PreflightError(f"check '{what} writable': {folder}: {exc.strerror or exc}") from None


def run_preflight(spec: RunSpec, manifest: DatasetManifest, scheduler: Scheduler,
                  warn: Callable[[str], None] | None = None) -> Evaluator:
    """Run every check; return the evaluator the training job will use. Warnings
    (a partition that is down) go to ``warn``."""
    for warning in check_scheduler(scheduler):
        (warn or log.warning)(f"warning: {warning}")
    check_writable(spec)
    interpreter, backend = check_pacemaker(spec)
    evaluator = resolve_evaluator(spec.site.pacemaker.evaluator, backend, interpreter)
    check_dataset_readable(spec, manifest, interpreter)
    check_database(spec)
    return evaluator
