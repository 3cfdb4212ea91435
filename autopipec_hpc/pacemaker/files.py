"""pacemaker's file contract: the names it reads and writes in an attempt's run directory,
the input we render for it, and the tables, results and progress we read back.

These names are pacemaker's (plus ``pacemaker.out``, ``progress.json`` and
``training.json``, ours) and are spelled only here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from autopipec_hpc.config import Evaluator, TrainConfig
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.templates import template_environment


PACEMAKER_INPUT = "input.yaml"


LOG_FILE = "log.txt"


OUTPUT_POTENTIAL = "output_potential.yaml"


INTERIM_POTENTIAL = "interim_potential_0.yaml"


STDOUT_LOG = "pacemaker.out"


RESULT_FILE = "training.json"


PROGRESS_FILE = "progress.json"


TRAIN_METRICS = "metrics.txt"


TEST_METRICS = "test_metrics.txt"


TEST_PREDICTIONS = "test_pred.pckl.gzip"


FITTING_DATA_INFO = "fitting_data_info.pckl.gzip"


@dataclass
class LiveProgress:
    """What a running attempt has reached, as ``progress.json`` in its run directory:
    read by `status` and `submit --wait` on the login node while the fit runs."""

    iteration: int
    maxiter: int
    loss: float
    rmse_energy_mev: float
    rmse_force_mev: float
    started_at: float
    updated_at: float
    s_per_iteration: float | None = None
    eta_s: float | None = None
    test_rmse_energy_mev: float | None = None
    test_rmse_force_mev: float | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> "LiveProgress | None":
        path = Path(run_dir) / PROGRESS_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # absent, or from another version: no progress to show


@dataclass
class TrainingResult:
    """What one pacemaker attempt produced; RMSEs in meV/atom and meV/A (per component)."""

    run_dir: str
    potential: str
    iterations: int
    wall_time_s: float
    train_rmse_energy_mev: float
    train_rmse_force_mev: float
    test_rmse_energy_mev: float | None
    test_rmse_force_mev: float | None
    # pacemaker ended the fit before maxiter because its test loss stopped improving (a normal end).
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> Path:
        path = Path(self.run_dir) / RESULT_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainingResult":
        return cls(**json.loads((Path(run_dir) / RESULT_FILE).read_text()))


def render_input(
    config: TrainConfig,
    elements: Sequence[str],
    train_files: Sequence[str],
    test_files: Sequence[str],
    evaluator: str,
    generation: int = 0,
) -> str:
    """pacemaker's input.yaml for ``config``; dataset paths as given (absolute is safest)."""
    template = template_environment().get_template("input.yaml.j2")
    return template.render(
        config=config,
        elements=list(elements),
        train_files=list(train_files),
        test_files=list(test_files),
        evaluator=str(evaluator),
        generation=generation,
        display_step=display_step(config, bool(test_files)),
    )


def display_step(config: TrainConfig, has_test_set: bool) -> int:
    """pacemaker's ``backend.display_step``: how often it prints a full block and evaluates the
    test loss. Early stopping sees the test loss only then, and pacemaker's window covers one
    display step less than the patience, so the step is kept to a fifth of the patience."""
    step = max(1, min(50, config.maxiter // 20 or 1))
    if has_test_set and config.early_stopping_min_improvement is not None:
        step = max(1, min(step, config.early_stopping_patience // 5))
    return step


def read_metrics_table(path: Path) -> pd.DataFrame | None:
    """pacemaker's whitespace tables (metrics.txt, test_metrics.txt); None if absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    table = pd.read_csv(path, sep=r"\s+")
    table = table[pd.to_numeric(table["iter_num"], errors="coerce").notna()]  # repeated headers
    return table.apply(pd.to_numeric, errors="coerce") if len(table) else None


def last_metrics(table: pd.DataFrame | None) -> tuple[float | None, float | None, int]:
    if table is None:
        return None, None, 0
    last = table.iloc[-1]
    return 1000.0 * float(last["rmse_epa"]), 1000.0 * float(last["rmse_f_comp"]), int(last["iter_num"])


def log_tail(run_dir: Path, lines: int = 25) -> str:
    for name in (LOG_FILE, STDOUT_LOG):
        path = Path(run_dir) / name
        if path.exists():
            text = path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
    return ""


# What pacemaker's log says when its early stopping ends a fit (pyace/generalfit.py): it raises
# StopIteration in scipy's callback, scipy returns the last iterate and pacemaker finishes as usual.
EARLY_STOPPING_MARK = "EARLY STOPPING:"


def stopped_early(run_dir: Path) -> bool:
    """Whether pacemaker's early stopping ended this attempt's fit."""
    path = Path(run_dir) / LOG_FILE
    try:
        with open(path, errors="replace") as log:
            return any(EARLY_STOPPING_MARK in line for line in log)
    except OSError:
        return False


# When the optimizer has already ended (maxiter), tensorpot computes the test metrics once
# more outside scipy, and a window that now qualifies raises pacemaker's early-stopping
# exception straight out of the fit: exit 1, no output_potential.yaml, although every
# iteration ran (interim_potential_0.yaml holds the last iterate). Seen on warm starts.
LATE_EARLY_STOP = "pyace.generalfit.TestLossChangeTooSmallException:"


def ended_by_late_early_stop(run_dir: Path) -> bool:
    """Whether pacemaker's exit came from its early stopping raised after the optimizer's
    last iteration (the last line of its output names that exception), with the last
    iterate saved."""
    path = Path(run_dir) / STDOUT_LOG
    try:
        lines = path.read_text(errors="replace").splitlines()[-5:]
    except OSError:
        return False
    last = next((line for line in reversed(lines) if line.strip()), "")
    return last.startswith(LATE_EARLY_STOP) and (Path(run_dir) / INTERIM_POTENTIAL).exists()


def iterations_done(run_dir: Path) -> int:
    """Iterations an attempt completed, from pacemaker's metrics table."""
    table = read_metrics_table(Path(run_dir) / TRAIN_METRICS)
    return 0 if table is None else int(table["iter_num"].max())


def learning_curve(run_dir: Path) -> pd.DataFrame | None:
    """Iteration, loss and energy/force RMSE (meV/atom, meV/A) on the training set and,
    where pacemaker had one, the test set: one attempt's learning curve."""
    train = read_metrics_table(Path(run_dir) / TRAIN_METRICS)
    if train is None:
        return None
    curve = pd.DataFrame({
        "iteration": train["iter_num"].astype(int),
        "loss": train["loss"],
        "train_energy_rmse_mev": 1000.0 * train["rmse_epa"],
        "train_force_rmse_mev": 1000.0 * train["rmse_f_comp"],
    })
    test = read_metrics_table(Path(run_dir) / TEST_METRICS)
    if test is not None:
        test_part = pd.DataFrame({
            "iteration": test["iter_num"].astype(int),
            "test_loss": test["loss"],
            "test_energy_rmse_mev": 1000.0 * test["rmse_epa"],
            "test_force_rmse_mev": 1000.0 * test["rmse_f_comp"],
        })
        curve = curve.merge(test_part, on="iteration", how="left")
    return curve.drop_duplicates("iteration", keep="last").reset_index(drop=True)


def count_parameters(config: TrainConfig, elements: Sequence[str]) -> int | None:
    """The number of fitted coefficients of the basis ``config`` gives for ``elements``,
    from pyace's own basis construction (what pacemaker reports as 'params');
    None where pyace cannot be imported in this process."""
    try:
        from pyace import create_multispecies_basis_config
    except ImportError:
        return None
    potential = yaml.safe_load(render_input(config, elements, ["-"], [], Evaluator.PYACE))["potential"]
    return len(create_multispecies_basis_config(potential).get_all_coeffs())
