"""Processes on this machine: whether one still runs (local jobs, a submitting process),
tying a process's life to its parent's, and ending a child's whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from autopipec_hpc.errors import TrainingInterrupted

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


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
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


def forward_termination(proc: subprocess.Popen):
    """While pacemaker runs, SIGTERM/SIGINT to us (scancel, a cancel) also end its group."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        kill_group(proc, grace_s=2.0)
        raise TrainingInterrupted(f"training interrupted by signal {signal.Signals(signum).name}")

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def restore_termination(previous) -> None:
    if previous:
        for sig, old in previous.items():
            signal.signal(sig, old)
