"""Processes on this machine: whether one still runs (local jobs, a submitting process),
and tying a process's life to its parent's."""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (finished, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have Linux send ``sig`` to this process when its parent dies (PR_SET_PDEATHSIG);
    nothing where prctl is missing. Safe between fork and exec (a preexec_fn)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def die_with_local_controller() -> None:
    """At the start of a job body on submitit's local executor: end with the controller
    process whose pid is the job id. Killed outright (kill -9 of the job id), it cannot
    forward anything, and the body would train on unseen; SIGKILL, because submitit's job
    environment ignores SIGTERM. On SLURM the job's own step ends the body."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return
    die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # the controller was gone before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
