"""Processes on this machine: whether one still runs (local jobs, a submitting process),
tying a process's life to its parent's, ending a child's whole process group, and a
job body told to stop (``stop_on_signals``, ``commit_point``)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopipec_hpc.errors import JobStopped, TrainingInterrupted

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


@dataclass
class _Forwarding:
    proc: subprocess.Popen
    handlers: dict[int, Any] = field(default_factory=dict)  # ours, installed for this run only


def forward_termination(proc: subprocess.Popen) -> _Forwarding | None:
    """While pacemaker runs, SIGTERM/SIGINT to us (scancel, a cancel) also end its group:
    in a job body (``stop_on_signals``) it is one of the children a stop ends; elsewhere
    handlers that do the same are installed for the time it runs."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _STOP.children.append(proc)
    forwarding = _Forwarding(proc)
    if _STOP.installed:
        return forwarding

    def handler(signum, frame):
        kill_group(proc, grace_s=2.0)
        raise TrainingInterrupted(f"training interrupted by signal {signal.Signals(signum).name}")

    forwarding.handlers = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    return forwarding


def restore_termination(previous: _Forwarding | None) -> None:
    if previous is None:
        return
    if previous.proc in _STOP.children:
        _STOP.children.remove(previous.proc)
    for sig, old in previous.handlers.items():
        signal.signal(sig, old)


# -- a job told to stop ----------------------------------------------------------------------
# submitit's job environment ignores SIGTERM ("Bypassing signal") until the SIGKILL that
# follows 10-30 s later, so a cancelled job would go on and publish or commit meanwhile.
# A job body installs ``stop_on_signals`` instead: the first SIGTERM/SIGINT marks the job
# stopping, ends the process groups of its registered children, and raises JobStopped in
# the body -- except inside a ``commit_point``, whose check and commit are one step with
# respect to the signal: a signal received before the check means no commit, one received
# after it finds the commit being done (and the body then ends as it would have).

@dataclass
class _StopState:
    signal: str | None = None  # the first stopping signal received, by name
    installed: bool = False
    committing: int = 0  # inside commit_point: note a signal, raise nothing
    children: list[subprocess.Popen] = field(default_factory=list)
    on_stop: list[Callable[[str], None]] = field(default_factory=list)


_STOP = _StopState()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_message(name: str) -> str:
    return f"stopped by {name} (a cancel, an scancel or the end of its time limit)"


def _on_stop_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    first = _STOP.signal is None
    if first:
        _STOP.signal = name
    for proc in list(_STOP.children):
        kill_group(proc, grace_s=2.0)
    if first:
        for hook in list(_STOP.on_stop):
            try:
                hook(name)
            except Exception:  # a marker that cannot be written must not hide the stop
                pass
    if not _STOP.committing:
        raise JobStopped(_stop_message(name))


def stop_on_signals(on_stop: Callable[[str], None] | None = None) -> None:
    """At the start of a job body: SIGTERM and SIGINT mean "stop" (see above). ``on_stop``
    hears the first signal's name once (the body's marker of it). Idempotent; nothing
    outside the main thread, where Python cannot install handlers."""
    if on_stop is not None and on_stop not in _STOP.on_stop:
        _STOP.on_stop.append(on_stop)
    if _STOP.installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    _STOP.installed = True
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        _STOP.on_stop.append(_mark_local_job_cancelled)


def stop_requested() -> str | None:
    """The name of the stopping signal this job received, or None."""
    return _STOP.signal


def raise_if_stopping(what: str) -> None:
    """Raise JobStopped if this job was told to stop (before ``what``)."""
    if _STOP.signal is not None:
        raise JobStopped(f"{what} not done: {_stop_message(_STOP.signal)}")


@contextmanager
def commit_point(what: str) -> Iterator[None]:
    """The one step where a job publishes or commits: refused (JobStopped) if a stop was
    received before it, never interrupted by one received during it."""
    _STOP.committing += 1
    try:
        raise_if_stopping(what)
        yield
    finally:
        _STOP.committing -= 1


def final_commit(what: str) -> None:
    """``commit_point`` for a body whose commit is its last step (the select job's rows):
    refused (JobStopped) if a stop came first; a stop received from here on is only noted,
    and the body commits and finishes."""
    _STOP.committing += 1
    try:
        raise_if_stopping(what)
    except JobStopped:
        _STOP.committing -= 1
        raise


def run_child(args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """A tool run by a job body, in its own process group that a stop ends (a scancel's
    SIGTERM to the tool alone would read as the tool failing, "exit -15")."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_parent)
    _STOP.children.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        kill_group(proc, grace_s=2.0)
        raise
    finally:
        _STOP.children.remove(proc)
    if proc.returncode < 0:
        raise_if_stopping(f"{Path(args[0]).name}")  # ended by the stop, not by its own fault
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# -- a local job's cancelled marker ----------------------------------------------------------

def local_cancel_marker(folder: str | Path, job_id: str) -> Path:
    """The file that says a local job was cancelled (by `cancel` or a SIGTERM by hand):
    what sacct's CANCELLED is to a SLURM job."""
    return Path(folder) / f"{job_id}.cancelled"


def _mark_local_job_cancelled(name: str) -> None:
    """A local job body stopped by SIGTERM (`cancel`, or a kill by hand: the local scancel)
    reads CANCELLED; a SIGINT is the local controller ending it at its time limit."""
    if name != "SIGTERM":
        return
    import submitit

    env = submitit.JobEnvironment()
    local_cancel_marker(env.paths.folder, env.job_id).touch()
