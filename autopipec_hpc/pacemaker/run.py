"""One pacemaker attempt on a compute node: start it in its own process group, stream and
parse its stdout into ``progress.json``, stop it on a cancel or a timeout, read its result.

What the attempt directory holds is pacemaker's file contract (``pacemaker/files.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autopipec_hpc.config import LADDER_WARM_START, TrainConfig, resolve_command
from autopipec_hpc.dataset_files import read_pickle
from autopipec_hpc.errors import TrainingDivergenceError, TrainingFailedError, TrainingInterrupted
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.pacemaker.environment import thread_environment
from autopipec_hpc.pacemaker.files import (
    INTERIM_POTENTIAL,
    OUTPUT_POTENTIAL,
    PACEMAKER_INPUT,
    PROGRESS_FILE,
    STDOUT_LOG,
    TEST_METRICS,
    TRAIN_METRICS,
    LiveProgress,
    TrainingResult,
    ended_by_late_early_stop,
    last_metrics,
    log_tail,
    read_metrics_table,
    render_input,
    stopped_early,
)
from autopipec_hpc.processes import die_with_parent, forward_termination, kill_group, restore_termination

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
        on_progress: Callable[[FitProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        threads: int | None = None,
    ) -> None:
        self.command = command
        self.evaluator = str(evaluator)
        self.threads = threads  # CPU threads for pacemaker (the job's CPUs); None: leave as is
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
            if config.ladder_step is not None:
                # Refused at submission (TrainConfig, warm_start.check_warm_start); a requeued
                # ladder fit lands here, and `-p` would silently restart it from nothing.
                raise TrainingFailedError(f"{LADDER_WARM_START} ({initial_potential})")
            args += ["-p", str(Path(initial_potential).resolve())]
        start = time.monotonic()
        returncode = self._run(args, run, config.timeout_hours * 3600.0, config.maxiter)
        wall = time.monotonic() - start
        late_stop = returncode != 0 and ended_by_late_early_stop(run)
        if late_stop:
            # The fit is complete: keep its last iterate as pacemaker would have written it.
            atomic_write_text(run / OUTPUT_POTENTIAL, (run / INTERIM_POTENTIAL).read_text())
        elif returncode != 0:
            raise TrainingFailedError(
                f"pacemaker exited with code {returncode} in {run}", log_tail=log_tail(run)
            )
        potential = run / OUTPUT_POTENTIAL
        if not potential.exists():
            raise TrainingFailedError(f"pacemaker left no {OUTPUT_POTENTIAL} in {run}", log_tail=log_tail(run))
        e_train, f_train, iterations = last_metrics(read_metrics_table(run / TRAIN_METRICS))
        e_test, f_test, _ = last_metrics(read_metrics_table(run / TEST_METRICS))
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
            stopped_early=late_stop or stopped_early(run),
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
        previous = forward_termination(proc)
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
                    kill_group(proc, grace_s=2.0)
                    raise TrainingInterrupted("training stopped: cancel requested")
                if time.monotonic() >= deadline:
                    kill_group(proc)
                    reader.join(timeout=10)
                    raise TrainingFailedError(
                        f"pacemaker exceeded the timeout of {timeout_s:.0f} s and was killed",
                        log_tail=log_tail(run),
                    )
        except BaseException:
            # A requeue (submitit's SIGUSR2 handler exits) or any error in here:
            # pacemaker runs in its own session, so it must be ended explicitly.
            kill_group(proc, grace_s=2.0)
            raise
        finally:
            restore_termination(previous)
        reader.join(timeout=30)
        return proc.returncode

    def _stream(self, proc: subprocess.Popen, run: Path, maxiter: int) -> None:
        """Copy pacemaker's stdout to ``pacemaker.out``, keep ``progress.json`` current and
        print one line per iteration to the job's log (a compute node has no terminal)."""
        with open(run / STDOUT_LOG, "a", buffering=1) as log:
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
                print(f"iteration {state.iteration}/{maxiter}: loss {state.loss:.3e}  "
                      f"E {state.rmse_energy_mev:.2f} meV/at  F {state.rmse_force_mev:.1f} meV/A",
                      file=sys.stderr, flush=True)
                if self.on_progress:
                    self.on_progress(state)


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


