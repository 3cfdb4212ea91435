"""A FAULT INJECTOR: EMT that fails on chosen rows, for tests of failure tagging.

A real DFT code fails on its own terms (GPAW's KohnShamConvergenceError is tested for real
with too few SCF iterations); the failures no code shows on demand (a hang past the time
limit, a non-finite energy, atoms moved by a relaxation, a process killed mid-row) are
injected here, each on the rows named in its kwargs. The label task puts the row id in
``atoms.info["label_row_id"]``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from ase.calculators.emt import EMT


class InjectedFault(RuntimeError):
    """The failure this fault injector was told to raise."""


class FaultInjectingEMT(EMT):
    """EMT, except on ``fail_rows`` (raise), ``nan_rows`` (a NaN energy), ``slow_rows`` (sleep
    ``sleep_s`` first), ``move_rows`` (moves the atoms, as a relaxation would) and
    ``kill_rows`` (SIGKILL of its own process, once ``kill_marker`` does not exist yet) and
    ``shift_rows`` (an energy off by ``shift_ev_per_atom``)."""

    def __init__(self, fail_rows: Sequence[int] = (), nan_rows: Sequence[int] = (), slow_rows: Sequence[int] = (),
                 move_rows: Sequence[int] = (), kill_rows: Sequence[int] = (), shift_rows: Sequence[int] = (),
                 sleep_s: float = 5.0, shift_ev_per_atom: float = 1.0, kill_marker: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault = {"fail": set(fail_rows), "nan": set(nan_rows), "slow": set(slow_rows),
                      "move": set(move_rows), "kill": set(kill_rows), "shift": set(shift_rows)}
        self.shift_ev_per_atom = shift_ev_per_atom
        self.sleep_s = sleep_s
        self.kill_marker = kill_marker

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        row = (atoms if atoms is not None else self.atoms).info.get("label_row_id")
        if row in self.fault["kill"] and not (self.kill_marker and os.path.exists(self.kill_marker)):
            if self.kill_marker:
                open(self.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        if row in self.fault["fail"]:
            raise InjectedFault(f"injected failure on row {row}")
        if row in self.fault["slow"]:
            time.sleep(self.sleep_s)
        super().calculate(atoms, properties, system_changes)
        if row in self.fault["shift"]:  # a plausible-looking but wrong energy (a broken setup)
            self.results["energy"] += self.shift_ev_per_atom * len(self.atoms)
        if row in self.fault["nan"]:
            self.results["energy"] = float("nan")
        if row in self.fault["move"] and atoms is not None:
            atoms.positions[0] += 0.1
