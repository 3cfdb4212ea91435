"""FAULT INJECTOR, not pacemaker: a stand-in that fails on purpose.

A real pacemaker cannot be made to crash, diverge or hang on demand, so the
failure paths are tested with this script instead. It accepts pacemaker's
command line (an input file, ``-p POTENTIAL``) and then:

- ``crash``: logs a few lines like pacemaker, then exits with status 1;
- ``diverge``: "finishes" normally but reports an energy RMSE of 1e6 eV/atom;
- ``hang``: never finishes (and leaves a grandchild), until it is killed.

``make_fault_pacemaker(directory, mode)`` writes an executable named
``fault-pacemaker-<mode>`` to use as a site's ``pacemaker.command``. The names
of pacemaker's files come from ``pacemaker_wrapper`` and are written into that
executable, so it starts without importing the pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HEADER = (
    "ladder_step cycle_step iter_num loss e_loss_contrib f_loss_contrib reg_loss rmse_epa rmse_f_comp "
    "low_rmse_epa low_rmse_f_comp mae_f_comp low_mae_f_comp nfuncs ncoefs"
)


@dataclass(frozen=True)
class PacemakerFiles:
    """The pacemaker files the injector writes (names from ``pacemaker_wrapper``)."""

    log: str
    metrics: str
    potential: str


def _log(files: PacemakerFiles, line: str) -> None:
    print(line, flush=True)
    with open(files.log, "a") as handle:
        handle.write(line + "\n")


def crash(files: PacemakerFiles) -> int:
    _log(files, "INFO - Start pacemaker (fault injector: crash)")
    _log(files, f"INFO - Loading {sys.argv[1] if len(sys.argv) > 1 else 'the input'}...")
    _log(files, "ERROR - simulated failure: std::bad_alloc in ACE basis construction")
    return 1


def diverge(files: PacemakerFiles) -> int:
    _log(files, "INFO - Start pacemaker (fault injector: diverge)")
    rows = []
    for it, rmse in enumerate([1.0, 1e3, 1e6]):
        _log(files, f"Iteration   #{it}   (1 evals):   Loss: {rmse:.4e} | RMSE Energy(low): {rmse * 1000:.2f} "
                    f"({rmse * 1000:.2f}) meV/at | Forces(low): {rmse * 1000:.2f} ({rmse * 1000:.2f}) meV/A")
        rows.append(f"0 0 {it} {rmse} 0 0 0 {rmse} {rmse} {rmse} {rmse} {rmse} {rmse} 1 1")
    Path(files.metrics).write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    Path(files.potential).write_text("# fault injector: not a potential\n")
    return 0


def hang(files: PacemakerFiles) -> int:
    _log(files, "INFO - Start pacemaker (fault injector: hang)")
    Path("pacemaker.pid").write_text(str(os.getpid()))
    child = subprocess.Popen(["sleep", "3600"])  # a grandchild the timeout must also end
    Path("grandchild.pid").write_text(str(child.pid))
    while True:
        time.sleep(1)


MODES = {"crash": crash, "diverge": diverge, "hang": hang}


def main(mode: str, files: PacemakerFiles) -> None:
    sys.exit(MODES[mode](files))


def make_fault_pacemaker(directory: str | Path, mode: str) -> Path:
    from autopipec_hpc.pacemaker.files import LOG_FILE, OUTPUT_POTENTIAL, TRAIN_METRICS

    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; expected one of {sorted(MODES)}")
    files = PacemakerFiles(log=LOG_FILE, metrics=TRAIN_METRICS, potential=OUTPUT_POTENTIAL)
    path = Path(directory) / f"fault-pacemaker-{mode}"
    path.write_text(
        f"#!{sys.executable}\n"
        "# FAULT INJECTOR (autopipec_hpc.testing.fault_pacemaker), not pacemaker.\n"
        "from autopipec_hpc.testing.fault_pacemaker import PacemakerFiles, main\n"
        f"main({mode!r}, {files!r})\n"
    )
    path.chmod(0o755)
    return path
