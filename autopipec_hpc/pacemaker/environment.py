"""pacemaker's environment on a node: which interpreter runs it, what it has installed,
what devices TensorFlow sees there, and how many threads a job gives it."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopipec_hpc.config import Evaluator, SiteConfig, resolve_command
from autopipec_hpc.errors import GPUUnavailableError, TrainingFailedError

log = logging.getLogger(__name__)


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


def job_threads(site: SiteConfig) -> int:
    """CPU threads for pacemaker: SLURM's --cpus-per-task where SLURM runs the job,
    else the site's ``train.cpus``; never the node's core count."""
    try:
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    except (KeyError, ValueError):
        return site.train.cpus


def check_backend(site: SiteConfig, evaluator: str, threads: int) -> dict[str, Any]:
    """In the job's first seconds: what pacemaker's environment holds and which
    devices TensorFlow sees there. A GPU job whose TensorFlow sees no GPU fails at
    once (GPUUnavailableError) unless the site allows the CPU fallback."""
    tensorpot = evaluator == Evaluator.TENSORPOT
    # Importing TensorFlow to list devices costs seconds: only where a GPU was asked for.
    backend = probe_backend(site.pacemaker.command, devices=tensorpot and site.train.gpus > 0)
    host = os.uname().nodename
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = "CPU" if tensorpot else "CPU (pyace evaluator)"
    if tensorpot and backend.gpus:
        devices = ", ".join(backend.gpus)
    elif tensorpot and site.train.gpus > 0:
        seen = ", ".join(backend.cpus or []) or "nothing"
        problem = (f"node {host}: CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'} "
                   f"but TensorFlow {backend.tensorflow} sees no GPU (it sees {seen})")
        if not site.pacemaker.allow_cpu_fallback:
            raise GPUUnavailableError(f"{problem}; set pacemaker.allow_cpu_fallback: true to train on the CPU")
        log.warning("%s; training on the CPU (pacemaker.allow_cpu_fallback)", problem)
        devices = "CPU (fallback: TensorFlow saw no GPU)"
    return {
        "host": host,
        "cuda_visible_devices": visible or "",
        "evaluator": evaluator,
        "devices": devices,
        "threads": threads,
        "tensorflow_version": backend.tensorflow or "",
        "tensorpotential_version": backend.tensorpotential or "",
        "python_ace_version": backend.python_ace or "",
    }
