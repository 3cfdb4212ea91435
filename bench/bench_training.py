"""Training speed and memory: pacemaker's pyace against its TensorFlow evaluator (tensorpot).

Run from the project root (needs ../shared/data/cu_fhiaims_105.extxyz):

    .venv/bin/python bench/bench_training.py                 # ~10 min on 2 cores
    .venv/bin/python bench/bench_training.py --functions 16 100 --iterations 10

Data: about 1,000 structures, the 105 DFT Cu cells cycled and rattled (0.02 A),
through our own dataset stage (ZBL delta targets, 90/10 split). Each fit is
the real `pacemaker input.yaml` in a fresh folder with the input.yaml our
wrapper renders (max_degree 4, cutoff 5 A), 2 CPU threads.

(a) Time per iteration. tensorpot: a fit of N iterations; the time per
    iteration is measured between pacemaker's first and last reported
    iteration, so TensorFlow's one-off graph tracing is left out (and shown
    apart). pyace has no analytic gradient: scipy's BFGS differentiates by
    finite differences, (parameters + 1) loss evaluations per gradient. A full
    pyace iteration at 100 functions takes about ten minutes, so pyace runs
    for a fixed budget, its loss evaluations are counted from its output, and
    the time per iteration is (parameters + 1) x the measured time per
    evaluation: a lower bound (the line search adds more evaluations).
(b) Peak memory (max RSS of the pacemaker process tree, from
    getrusage(RUSAGE_CHILDREN) in a fresh wrapper process) of tensorpot fits
    of a few iterations at each size and several batch sizes, and the largest
    batch size that stays under --memory-limit-gb.
(c) GPU: where TensorFlow sees a GPU, the same fit on the GPU against the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, rattled_copies  # noqa: E402

from autopipec_hpc.config import TrainConfig  # noqa: E402
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings  # noqa: E402
from autopipec_hpc.pacemaker.environment import thread_environment
from autopipec_hpc.pacemaker.files import count_parameters, render_input
from autopipec_hpc.pacemaker.run import IterationParser

PACEMAKER = Path(sys.executable).parent / "pacemaker"
EVAL_LINE = re.compile(r"Eval (\d+): loss=")
THREADS = 2

# Runs pacemaker in a fresh process and reports the peak RSS of its process tree.
_MAXRSS = r"""
import resource, subprocess, sys, json
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"rc": done.returncode,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def build_dataset(root: Path, n: int) -> tuple[list[str], list[str]]:
    structures = rattled_copies(cu_structures(), n, stdev=0.02)
    manifest = DatasetBuilder(DatasetSettings(seed=1)).prepare_dataset(structures, root / "dataset")
    return [str(p) for p in manifest.train_paths], [str(p) for p in manifest.test_paths]


def config_for(functions: int, maxiter: int, batch_size: int = 100) -> TrainConfig:
    return TrainConfig(b_basis_size=functions, max_degree=4, maxiter=maxiter, batch_size=batch_size,
                       energy_weight=1.0, force_weight=1.0)


def write_input(folder: Path, config: TrainConfig, evaluator: str, data: tuple[list[str], list[str]]) -> None:
    folder.mkdir(parents=True)
    train, _ = data
    # No test set: the benchmark times the fit itself.
    (folder / "input.yaml").write_text(render_input(config, ["Cu"], train, [], evaluator))


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **thread_environment(THREADS), **(extra or {})}


def time_tensorpot(folder: Path, env_extra: dict[str, str] | None = None) -> dict:
    """Run a tensorpot fit; seconds per iteration between the first and last iteration seen."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(PACEMAKER), "input.yaml"], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment(env_extra))
    parser = IterationParser()
    seen: list[tuple[int, float]] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        state = parser.feed(line)
        if state is not None and not state.test:
            seen.append((state.iteration, time.perf_counter()))
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or len(seen) < 2:
        sys.exit(f"tensorpot fit failed in {folder} (exit {proc.returncode})")
    # pacemaker repeats the last iteration in its final summary: use distinct iterations only.
    first_it, first_t = seen[0]
    last_it, last_t = max(seen, key=lambda x: (x[0], -x[1]))
    last_t = min(t for it, t in seen if it == last_it)
    return {"s_per_iteration": (last_t - first_t) / (last_it - first_it), "startup_s": first_t - start,
            "wall_s": wall, "iterations": last_it}


def time_pyace_evaluations(folder: Path, budget_s: float) -> dict:
    """Let pyace run for ``budget_s``; seconds per loss evaluation from its 'Eval N' lines
    (printed without newlines, so the output is read in raw chunks)."""
    proc = subprocess.Popen([str(PACEMAKER), "input.yaml"], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=environment())
    stamps: list[float] = []

    def read() -> None:
        tail = b""
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
            if not chunk:
                return
            text = tail + chunk
            found = len(EVAL_LINE.findall(text.decode(errors="replace")))
            stamps.extend([time.perf_counter()] * found)
            cut = text.rfind(b"Eval ")
            tail = text[cut + 1:] if found else text[-200:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        pass
    proc.kill()
    proc.wait()
    reader.join(timeout=5)
    if len(stamps) < 3:
        return {"s_per_evaluation": None, "evaluations": len(stamps)}
    return {"s_per_evaluation": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "evaluations": len(stamps)}


def peak_memory(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MAXRSS, str(PACEMAKER), "input.yaml"], cwd=folder,
                          capture_output=True, text=True, env=environment())
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rc": info["rc"], "peak_gb": info["maxrss_kb"] / 1024**2}


def tensorflow_gpus() -> list[str]:
    code = "import tensorflow as tf; print([d.name for d in tf.config.list_physical_devices('GPU')])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "[]"
    return eval(last) if last.startswith("[") else []  # noqa: S307 - our own print


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=1000)
    parser.add_argument("--functions", type=int, nargs="+", default=[16, 100, 300])
    parser.add_argument("--iterations", type=int, default=15, help="tensorpot iterations per timing fit")
    parser.add_argument("--pyace-budget-s", type=float, default=60.0, help="seconds of pyace per size")
    parser.add_argument("--memory-batch-sizes", type=int, nargs="+", default=[1000, 100, 20])
    parser.add_argument("--memory-limit-gb", type=float, default=2.0)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not PACEMAKER.exists():
        sys.exit(f"pacemaker not found at {PACEMAKER}")

    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    data = build_dataset(root, args.structures)
    banner(f"(a) time per iteration, pyace vs tensorpot, {args.structures} Cu structures, {THREADS} threads")
    print(machine_line())
    print(f"{'functions':>9} {'params':>6} {'tensorpot s/it':>14} {'TF start-up s':>13} "
          f"{'pyace s/eval':>12} {'pyace s/it (>=)':>15} {'pyace / tensorpot':>17}")
    for functions in args.functions:
        params = count_parameters(config_for(functions, 1), ["Cu"])
        tp_dir = root / f"tensorpot-{functions}"
        write_input(tp_dir, config_for(functions, args.iterations), "tensorpot", data)
        tp = time_tensorpot(tp_dir)
        py_dir = root / f"pyace-{functions}"
        write_input(py_dir, config_for(functions, 1), "pyace", data)
        py = time_pyace_evaluations(py_dir, args.pyace_budget_s)
        per_eval = py["s_per_evaluation"]
        py_iteration = None if per_eval is None or params is None else per_eval * (params + 1)
        ratio = "-" if py_iteration is None else f"{py_iteration / tp['s_per_iteration']:17.0f}x"
        print(f"{functions:>9} {params:>6} {tp['s_per_iteration']:>14.3f} {tp['startup_s']:>13.1f} "
              f"{per_eval if per_eval is not None else float('nan'):>12.3f} "
              f"{py_iteration if py_iteration is not None else float('nan'):>15.1f} {ratio:>17}", flush=True)
    print("pyace s/it = (params + 1) x measured s/eval: a lower bound, the BFGS line search adds evaluations")

    if not args.skip_memory:
        banner(f"(b) peak memory of a tensorpot fit ({args.iterations} iterations), by batch_size")
        print(f"{'functions':>9} " + " ".join(f"{'batch ' + str(b):>11}" for b in args.memory_batch_sizes)
              + f"   largest batch under {args.memory_limit_gb:g} GB")
        for functions in args.functions:
            peaks = []
            for batch in args.memory_batch_sizes:
                folder = root / f"mem-{functions}-{batch}"
                write_input(folder, config_for(functions, args.iterations, batch), "tensorpot", data)
                result = peak_memory(folder)
                peaks.append((batch, result["peak_gb"] if result["rc"] == 0 else float("nan")))
            fits = [b for b, gb in peaks if gb == gb and gb <= args.memory_limit_gb]
            print(f"{functions:>9} " + " ".join(f"{gb:>8.2f} GB" for _, gb in peaks)
                  + f"   {max(fits) if fits else 'none tried'}", flush=True)

    banner("(c) GPU against CPU")
    gpus = tensorflow_gpus()
    if not gpus:
        print("TensorFlow sees no GPU on this machine: nothing to compare (run this script on a GPU node).")
    else:
        folder = root / "gpu-100"
        write_input(folder, config_for(100, args.iterations), "tensorpot", data)
        gpu = time_tensorpot(folder)
        folder = root / "cpu-100"
        write_input(folder, config_for(100, args.iterations), "tensorpot", data)
        cpu = time_tensorpot(folder, {"CUDA_VISIBLE_DEVICES": ""})
        print(f"GPU {gpus[0]}: {1 / gpu['s_per_iteration']:.2f} it/s; CPU ({THREADS} threads): "
              f"{1 / cpu['s_per_iteration']:.2f} it/s; GPU / CPU = {cpu['s_per_iteration'] / gpu['s_per_iteration']:.1f}x")
    print(f"\nfolders: {root}")


if __name__ == "__main__":
    main()
