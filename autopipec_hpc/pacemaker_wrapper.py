"""Run the real pacemaker for one attempt: render its input, stream its output, read its metrics.

Each attempt gets its own run directory, which holds the whole story in
pacemaker's own file contract (input.yaml, log.txt, metrics.txt,
*_pred.pckl.gzip, output_potential.yaml) plus ``pacemaker.out`` (our copy of
its stdout), ``progress.json`` (the live progress) and ``training.json`` (what
we read from it). These names are pacemaker's contract and are spelled only
here, as the constants below; every other module uses them.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autopipec_hpc.config import Evaluator, TrainConfig, resolve_command
from autopipec_hpc.dataset_prep import read_pickle
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.processes import die_with_parent
from autopipec_hpc.errors import TrainingDivergenceError, TrainingFailedError, TrainingInterrupted

# The top-level job_templates/ folder, packaged into the wheel under this name (pyproject.toml).
TEMPLATES_PACKAGE = "autopipec_hpc.job_templates"
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

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
# Between display steps: "Iteration   #7  (1051 evals):  Loss: 9.5e-03 | RMSE Energy(low): 37.99 (..) meV/at | Forces(low): 97.14 (..) meV/A"
SHORT_ITERATION = re.compile(
    rf"(?:Iteration|Initial state:)\s*#(\d+).*?Loss:\s*{_NUM}.*?RMSE Energy\(low\):\s*{_NUM}.*?Forces\(low\):\s*{_NUM}",
    re.IGNORECASE,
)
# At display steps, a block: "Iteration:  #2   Loss:    Total:  3.9e-01 (100%)" ... "   RMSE:  E  E_low  F  F_low"
BLOCK_ITERATION = re.compile(rf"Iteration:\s*#(\d+)\s+Loss:\s+Total:\s*{_NUM}", re.IGNORECASE)
BLOCK_RMSE = re.compile(rf"^\s*RMSE:\s*{_NUM}\s+{_NUM}\s+{_NUM}", re.IGNORECASE)
# pyace prints one of these per loss evaluation, run together on one line: noise.
EVAL_NOISE = re.compile(r"Eval \d+: loss=\S+\s*")


# The header above a block of statistics on the holdout ("----TEST STATS----").
TEST_HEADER = re.compile(r"-{5,}\s*TEST\b")


class IterationParser:
    """Turns pacemaker's stdout lines into progress records (both of its formats);
    blocks under a TEST header carry the holdout's figures and are marked ``test``."""

    def __init__(self) -> None:
        self._block: tuple[int, float] | None = None
        self._test_next = False
        self._block_is_test = False

    def feed(self, line: str) -> "FitProgress | None":
        short = SHORT_ITERATION.search(line)
        if short:
            return FitProgress(int(short[1]), float(short[2]), float(short[3]), float(short[4]))
        if TEST_HEADER.search(line):
            self._test_next = True
            return None
        block = BLOCK_ITERATION.search(line)
        if block:
            self._block = (int(block[1]), float(block[2]))
            self._block_is_test, self._test_next = self._test_next, False
            return None
        rmse = BLOCK_RMSE.search(line)
        if rmse and self._block is not None:
            iteration, loss = self._block
            self._block = None
            return FitProgress(iteration, loss, float(rmse[1]), float(rmse[3]), test=self._block_is_test)
        return None


@dataclass
class FitProgress:
    iteration: int = 0
    loss: float = math.nan
    rmse_energy_mev: float = math.nan
    rmse_force_mev: float = math.nan
    test: bool = False


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


class ProgressRecorder:
    """Keeps ``progress.json`` of one attempt current. The time per iteration is
    measured from the first reported iteration on, so that TensorFlow's one-off
    graph tracing does not inflate the estimate."""

    def __init__(self, run: Path, maxiter: int, clock: Callable[[], float] = time.time) -> None:
        self.path = run / PROGRESS_FILE
        self.maxiter = maxiter
        self.clock = clock
        self.started_at = clock()
        self._first: tuple[int, float] | None = None
        self.current: LiveProgress | None = None

    def update(self, state: FitProgress) -> LiveProgress:
        now = self.clock()
        if state.test:
            if self.current is not None:
                self.current.test_rmse_energy_mev = state.rmse_energy_mev
                self.current.test_rmse_force_mev = state.rmse_force_mev
                self.current.updated_at = now
                self._save()
            return self.current  # type: ignore[return-value]
        if self._first is None:
            self._first = (state.iteration, now)
        first_iteration, first_at = self._first
        per = (now - first_at) / (state.iteration - first_iteration) if state.iteration > first_iteration else None
        previous = self.current
        self.current = LiveProgress(
            iteration=state.iteration,
            maxiter=self.maxiter,
            loss=state.loss,
            rmse_energy_mev=state.rmse_energy_mev,
            rmse_force_mev=state.rmse_force_mev,
            started_at=self.started_at,
            updated_at=now,
            s_per_iteration=per,
            eta_s=None if per is None else per * max(0, self.maxiter - state.iteration),
            test_rmse_energy_mev=previous.test_rmse_energy_mev if previous else None,
            test_rmse_force_mev=previous.test_rmse_force_mev if previous else None,
        )
        self._save()
        return self.current

    def _save(self) -> None:
        try:
            atomic_write_text(self.path, json.dumps(asdict(self.current)))
        except OSError:
            pass  # progress is for people watching; never fail a fit over it


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
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> Path:
        path = Path(self.run_dir) / RESULT_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainingResult":
        return cls(**json.loads((Path(run_dir) / RESULT_FILE).read_text()))


def yaml_float(value: float) -> str:
    """A float every YAML reader parses as a float: '1e-08' is a string to YAML 1.1."""
    text = repr(float(value))
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def template_environment(directory: Path | None = None) -> jinja2.Environment:
    """Jinja2 over ``directory``; by default the job templates installed with the package."""
    if directory is None:
        try:
            directory = Path(str(importlib.resources.files(TEMPLATES_PACKAGE)))
        except ModuleNotFoundError:
            raise TrainingFailedError(
                f"job templates not found: package {TEMPLATES_PACKAGE} is not installed"
            ) from None
    if not directory.is_dir():
        raise TrainingFailedError(f"job templates not found in {directory}")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["float"] = yaml_float
    return env


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
        display_step=max(1, min(50, config.maxiter // 20 or 1)),
    )


def read_metrics_table(path: Path) -> pd.DataFrame | None:
    """pacemaker's whitespace tables (metrics.txt, test_metrics.txt); None if absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    table = pd.read_csv(path, sep=r"\s+")
    table = table[pd.to_numeric(table["iter_num"], errors="coerce").notna()]  # repeated headers
    return table.apply(pd.to_numeric, errors="coerce") if len(table) else None


def _last_metrics(table: pd.DataFrame | None) -> tuple[float | None, float | None, int]:
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


def check_divergence(config: TrainConfig, energy_mev: float | None, force_mev: float | None, what: str) -> None:
    """NaN or an RMSE above the configured thresholds means the fit diverged."""
    for value, limit, name, unit in (
        (energy_mev, config.max_energy_rmse_mev, "energy RMSE", "meV/atom"),
        (force_mev, config.max_force_rmse_mev, "force RMSE", "meV/A"),
    ):
        if value is None:
            continue
        if not math.isfinite(value):
            raise TrainingDivergenceError(f"{what} {name} is {value}")
        if value > limit:
            raise TrainingDivergenceError(
                f"{what} {name} {value:.4g} {unit} exceeds the limit {limit:.4g} {unit}"
            )


class PacemakerWrapper:
    """Runs pacemaker for one attempt (``run_training``) in a run directory of its own.

    ``command`` is the pacemaker executable (it may live in another
    environment than ours); ``evaluator`` is pacemaker's backend (tensorpot or
    pyace). A whole generation (datasets, jobs, evaluation, publication) is
    ``submission.train_generation``.
    """

    def __init__(
        self,
        command: str = "pacemaker",
        evaluator: str = "tensorpot",
        console: Console | None = None,
        on_progress: Callable[[FitProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        threads: int | None = None,
    ) -> None:
        self.command = command
        self.evaluator = str(evaluator)
        self.threads = threads  # CPU threads for pacemaker (the job's CPUs); None: leave as is
        self.console = console or Console(stderr=True)
        self.on_progress = on_progress
        self.should_stop = should_stop  # polled each second while pacemaker runs

    def run_training(
        self,
        dataset_path: str | Path | Sequence[str | Path],
        test_path: str | Path | Sequence[str | Path] | None,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        elements: Sequence[str] | None = None,
        initial_potential: str | Path | None = None,
        generation: int = 0,
    ) -> TrainingResult:
        """Fit one potential in a fresh ``run_dir``; raise on failure or divergence."""
        train_files = _as_paths(dataset_path)
        test_files = _as_paths(test_path) if test_path else []
        run = fresh_dir(Path(run_dir) if run_dir else train_files[0].parent / "attempt")
        if elements is None:
            elements = _elements_of(train_files)
        text = render_input(config, elements, [str(p) for p in train_files],
                            [str(p) for p in test_files], self.evaluator, generation)
        atomic_write_text(run / PACEMAKER_INPUT, text)
        args = [resolve_command(self.command), PACEMAKER_INPUT]
        if initial_potential is not None:
            args += ["-p", str(Path(initial_potential).resolve())]
        start = time.monotonic()
        returncode = self._run(args, run, config.timeout_hours * 3600.0, config.maxiter)
        wall = time.monotonic() - start
        if returncode != 0:
            raise TrainingFailedError(
                f"pacemaker exited with code {returncode} in {run}", log_tail=log_tail(run)
            )
        potential = run / OUTPUT_POTENTIAL
        if not potential.exists():
            raise TrainingFailedError(f"pacemaker left no {OUTPUT_POTENTIAL} in {run}", log_tail=log_tail(run))
        e_train, f_train, iterations = _last_metrics(read_metrics_table(run / TRAIN_METRICS))
        e_test, f_test, _ = _last_metrics(read_metrics_table(run / TEST_METRICS))
        if e_train is None:
            raise TrainingFailedError(f"pacemaker wrote no {TRAIN_METRICS} in {run}", log_tail=log_tail(run))
        result = TrainingResult(
            run_dir=str(run),
            potential=str(potential),
            iterations=iterations,
            wall_time_s=wall,
            train_rmse_energy_mev=e_train,
            train_rmse_force_mev=f_train,
            test_rmse_energy_mev=e_test,
            test_rmse_force_mev=f_test,
        )
        result.save()
        check_divergence(config, e_train, f_train, "training")
        check_divergence(config, e_test, f_test, "pacemaker test-set")
        return result

    def _run(self, args: list[str], run: Path, timeout_s: float, maxiter: int) -> int:
        """Start pacemaker without a shell in its own process group; stream its output."""
        try:
            proc = subprocess.Popen(
                args,
                cwd=run,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,  # universal newlines: pacemaker's '\r' progress lines split too
                bufsize=1,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a job killed outright takes pacemaker along
                env={**os.environ, "PYTHONUNBUFFERED": "1", **thread_environment(self.threads)},
            )
        except FileNotFoundError:
            raise TrainingFailedError(f"pacemaker command not found: {args[0]!r}") from None
        previous = _forward_termination(proc)
        reader = threading.Thread(target=self._stream, args=(proc, run, maxiter), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                if proc.returncode is not None:
                    break
                if self.should_stop is not None and self.should_stop():
                    _kill_group(proc, grace_s=2.0)
                    raise TrainingInterrupted("training stopped: cancel requested")
                if time.monotonic() >= deadline:
                    _kill_group(proc)
                    reader.join(timeout=10)
                    raise TrainingFailedError(
                        f"pacemaker exceeded the timeout of {timeout_s:.0f} s and was killed",
                        log_tail=log_tail(run),
                    )
        except BaseException:
            # A requeue (submitit's SIGUSR2 handler exits) or any error in here:
            # pacemaker runs in its own session, so it must be ended explicitly.
            _kill_group(proc, grace_s=2.0)
            raise
        finally:
            _restore_termination(previous)
        reader.join(timeout=30)
        return proc.returncode

    def _stream(self, proc: subprocess.Popen, run: Path, maxiter: int) -> None:
        columns = (
            TextColumn("[bold]pacemaker"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with open(run / STDOUT_LOG, "a", buffering=1) as log, Progress(
            *columns, console=self.console, disable=not self.console.is_terminal, transient=False
        ) as bar:
            task = bar.add_task("fit", total=maxiter, status="starting")
            parser = IterationParser()
            recorder = ProgressRecorder(run, maxiter)
            for raw in proc.stdout:  # type: ignore[union-attr]
                line = EVAL_NOISE.sub("", raw).rstrip("\n")
                if not line.strip():
                    continue
                log.write(line + "\n")
                state = parser.feed(line)
                if state is None:
                    continue
                recorder.update(state)
                if state.test:
                    continue
                status = (
                    f"loss {state.loss:.3e}  E {state.rmse_energy_mev:.2f} meV/at  "
                    f"F {state.rmse_force_mev:.1f} meV/A"
                )
                bar.update(task, completed=min(state.iteration, maxiter), status=status)
                if not self.console.is_terminal:
                    self.console.print(f"iteration {state.iteration}/{maxiter}: {status}", highlight=False)
                if self.on_progress:
                    self.on_progress(state)


def thread_environment(threads: int | None) -> dict[str, str]:
    """Environment that holds TensorFlow, OpenMP and BLAS to ``threads`` CPU threads:
    the job's allocation, not the node's core count that they would take by default."""
    if not threads:
        return {}
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
        "TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": str(min(2, threads)),
    }


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


def pacemaker_python(command: str) -> str | None:
    """The interpreter of pacemaker's environment, from its console script's shebang."""
    path = shutil.which(resolve_command(command))
    if path is None:
        return None
    first = Path(path).read_bytes()[:512].split(b"\n", 1)[0].decode(errors="replace")
    if not first.startswith("#!"):
        return None
    return first[2:].strip().split()[0]


# Runs in pacemaker's environment (which may not be ours): versions, and what
# TensorFlow sees. Prints one JSON line last.
_PROBE = r"""
import json, os, sys
from importlib import metadata, util
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
info = {"python_ace": version("python-ace"), "tensorpotential": version("tensorpotential"),
        "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
        "tensorpot_importable": util.find_spec("tensorpotential") is not None and util.find_spec("tensorflow") is not None}
if sys.argv[1] == "devices" and info["tensorpot_importable"]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    info["tensorflow"] = tf.__version__
    info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    info["cpus"] = [d.name for d in tf.config.list_physical_devices("CPU")]
print(json.dumps(info))
"""


@dataclass
class BackendInfo:
    """What pacemaker's environment holds: versions, and the devices TensorFlow sees."""

    python_ace: str | None = None
    tensorpotential: str | None = None
    tensorflow: str | None = None
    tensorpot_importable: bool = False
    gpus: list[str] | None = None
    cpus: list[str] | None = None


def probe_backend(command: str, devices: bool = False, setup: Sequence[str] = (),
                  timeout_s: float = 180.0) -> BackendInfo:
    """Ask pacemaker's own interpreter (after the site's ``setup`` lines) what it has;
    with ``devices``, import TensorFlow there and list the GPUs it sees."""
    interpreter = pacemaker_python(command)
    if interpreter is None:
        raise TrainingFailedError(f"pacemaker command {command!r} is not a Python console script on this node")
    argv = [interpreter, "-c", _PROBE, "devices" if devices else "versions"]
    script = "\n".join([*setup, " ".join(shlex.quote(a) for a in argv)])
    try:
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TrainingFailedError(f"pacemaker's environment gave no answer within {timeout_s:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise TrainingFailedError(f"cannot inspect pacemaker's environment ({interpreter}): {tail}")
    return BackendInfo(**json.loads(lines[-1]))


def _as_paths(value) -> list[Path]:
    if isinstance(value, (str, Path)):
        return [Path(value).resolve()]
    return [Path(v).resolve() for v in value]


def _elements_of(files: Sequence[Path]) -> list[str]:
    elements: set[str] = set()
    for path in files:
        df = read_pickle(path)
        for atoms in df["ase_atoms"]:
            elements.update(atoms.get_chemical_symbols())
    return sorted(elements)


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _forward_termination(proc: subprocess.Popen):
    """While pacemaker runs, SIGTERM/SIGINT to us (scancel, a cancel) also end its group."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        _kill_group(proc, grace_s=2.0)
        raise TrainingInterrupted(f"training interrupted by signal {signal.Signals(signum).name}")

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_termination(previous) -> None:
    if previous:
        for sig, old in previous.items():
            signal.signal(sig, old)
