"""Energy/force balance: pacemaker's kappa against holdout errors of the deployed potential.

Run from the project root (needs ../shared/data/cu_fhiaims_105.extxyz):

    .venv/bin/python bench/bench_kappa.py                        # 5 kappas x 150 iterations: ~25 min on 2 cores
    .venv/bin/python bench/bench_kappa.py --maxiter 60 --kappa 0.3 0.9 0.99

Data: the 105 FHI-aims Cu cells cycled to 1,000 structures, each rattled by
0.02 A and carrying its base cell's DFT labels (as in bench_e2e.py and
bench_training.py), through our own dataset stage (``DatasetBuilder`` with the
settings ``submission.dataset_settings`` derives: ZBL delta targets, per-element reference
energies fitted on the training side, stratified split). One split, made once,
for every kappa: test_fraction 0.15 -> 850 training, 150 holdout structures.
``--structures 0`` uses the 105 cells as they are instead (exact labels, but a
15-structure holdout made mostly of 1- and 2-atom cells whose forces are zero
by symmetry: a weak test of forces).

Each fit: TrainConfig(b_basis_size=100, max_degree=4, maxiter=--maxiter,
kappa=kappa, i.e. energy_weight 1-kappa, force_weight kappa), run by ``PacemakerWrapper
.run_training`` (pacemaker's tensorpot evaluator, 2 threads), exactly as a
training job runs it. Scored like the evaluation job: the potential is staged
(``registry.stage_potential``: pace_yaml2yace, manifest) and the deployed
calculator ``registry.load_calculator`` (ACE + ZBL + reference energies)
predicts the holdout, compared with the raw DFT labels by
``evaluation.evaluate``. pacemaker's own test metrics are not used.

Caveat of the rattled data: rattled copies keep their base cell's labels, so
the force labels carry an error of the order of the rattle times the force
constant (tens of meV/A) that no fit can remove, and holdout structures are
rattled copies of cells that also appear in training. The figures compare
kappas with each other; they are not the accuracy on unseen chemistry.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, rattled_copies  # noqa: E402

from autopipec_hpc import evaluation, registry  # noqa: E402
from autopipec_hpc.config import TrainConfig  # noqa: E402
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest, DatasetSettings  # noqa: E402
from autopipec_hpc.errors import TrainingDivergenceError, TrainingFailedError  # noqa: E402
from autopipec_hpc.pacemaker.run import PacemakerWrapper  # noqa: E402

PACEMAKER = Path(sys.executable).parent / "pacemaker"
DEFAULT_KAPPAS = [0.05, 0.3, 0.6, 0.9, 0.99]
DEFAULT_MAXITER = 150
THREADS = 2


def base_config(maxiter: int, test_fraction: float, functions: int) -> TrainConfig:
    return TrainConfig(b_basis_size=functions, max_degree=4, maxiter=maxiter, test_fraction=test_fraction)


def config_for(base: TrainConfig, kappa: float) -> TrainConfig:
    # Through validation (not model_copy), as a user's `kappa: K` in train.yaml: weights 1-K, K.
    raw = {k: v for k, v in base.model_dump().items() if k not in ("energy_weight", "force_weight")}
    return TrainConfig.model_validate({**raw, "kappa": kappa})


def dataset_settings(config: TrainConfig) -> DatasetSettings:
    # What ``submission.dataset_settings`` derives from the training settings.
    return DatasetSettings(test_fraction=config.test_fraction, seed=config.seed, zbl_inner=config.zbl_inner,
                           zbl_outer=config.zbl_outer, reference_energies=config.reference_energies)


def build_dataset(root: Path, config: TrainConfig, n: int) -> DatasetManifest:
    base = cu_structures()
    structures = base if n == 0 else rattled_copies(base, n, stdev=0.02)
    if n == 0:
        for k, atoms in enumerate(structures, start=1):
            atoms.info["db_id"] = k
    return DatasetBuilder(dataset_settings(config)).prepare_dataset(structures, root / "dataset")


def label_scale(manifest: DatasetManifest) -> tuple[float, float]:
    """RMS spread of the holdout labels, for scale: the energy RMSE (meV/atom) of a model that predicts
    the holdout's mean energy per atom, and the force RMSE (meV/A) of one that predicts zero forces."""
    import numpy as np
    import pandas as pd

    e, f = [], []
    for path in manifest.test_paths:
        df = pd.read_pickle(path, compression="gzip")
        e += [row["energy_dft"] / len(row["ase_atoms"]) for _, row in df.iterrows()]
        f += [np.asarray(x).ravel() for x in df["forces_dft"]]
    e_arr, f_arr = np.array(e), np.concatenate(f)
    return 1000.0 * float(e_arr.std()), 1000.0 * float(np.sqrt(np.mean(f_arr**2)))


def fit_and_score(root: Path, manifest: DatasetManifest, config: TrainConfig) -> dict:
    """One fit as a training job runs it, scored as the evaluation job scores it."""
    from pyace import PyACECalculator

    run_dir = root / f"fit-kappa-{config.kappa:.4g}"
    wrapper = PacemakerWrapper(command=str(PACEMAKER), evaluator="tensorpot", threads=THREADS)
    t0 = time.perf_counter()
    try:
        # The wrapper prints one line per iteration to stderr (a job's log): keep it beside the fit.
        with open(root / f"{run_dir.name}.log", "w") as log, contextlib.redirect_stderr(log):
            result = wrapper.run_training(manifest.train_paths, manifest.test_paths, config,
                                          run_dir=run_dir, elements=manifest.elements)
    except TrainingDivergenceError as exc:
        return {"kappa": config.kappa, "config": config, "failed": f"diverged: {exc}",
                "wall_s": time.perf_counter() - t0}
    except TrainingFailedError as exc:
        return {"kappa": config.kappa, "config": config, "failed": f"failed: {exc}",
                "wall_s": time.perf_counter() - t0}
    fit_s = time.perf_counter() - t0
    staging = root / f"potential-kappa-{config.kappa:.4g}"
    registry.stage_potential(staging, Path(result.potential), None, manifest.elements, manifest.zbl_inner,
                             manifest.zbl_outer, manifest.reference_energies, 0, str(PACEMAKER))
    report, _ = evaluation.evaluate(manifest.test_paths, PyACECalculator(str(staging / registry.POTENTIAL_YAML)),
                                    registry.load_calculator(staging))
    return {
        "kappa": config.kappa, "config": config, "failed": None, "wall_s": fit_s,
        "iterations": result.iterations,
        "holdout_e": report.total.energy_rmse_mev, "holdout_f": report.total.force_rmse_mev,
        "residual_e": report.residual.energy_rmse_mev, "residual_f": report.residual.force_rmse_mev,
        "train_e": result.train_rmse_energy_mev, "train_f": result.train_rmse_force_mev,
    }


HEADER = (f"{'kappa':>6} {'E_w / F_w':>11} {'holdout E':>10} {'holdout F':>10} {'train E':>8} {'train F':>8} "
          f"{'iters':>5} {'fit wall s':>10}")
UNITS = f"{'':>6} {'':>11} {'meV/atom':>10} {'meV/A':>10} {'meV/at':>8} {'meV/A':>8} {'':>5} {'':>10}"


def row(r: dict, default_kappa: float) -> str:
    c = r["config"]
    mark = "  <- TrainConfig default" if abs(r["kappa"] - default_kappa) < 1e-9 else ""
    weights = f"{c.energy_weight:g} / {c.force_weight:g}"
    if r["failed"]:
        return f"{r['kappa']:>6.3g} {weights:>11} {r['failed']}{mark}"
    return (f"{r['kappa']:>6.3g} {weights:>11} {r['holdout_e']:>10.1f} {r['holdout_f']:>10.1f} "
            f"{r['train_e']:>8.1f} {r['train_f']:>8.1f} {r['iterations']:>5d} {r['wall_s']:>10.0f}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maxiter", type=int, default=DEFAULT_MAXITER,
                        help=f"pacemaker iterations per fit (default {DEFAULT_MAXITER})")
    parser.add_argument("--kappa", type=float, nargs="+", default=DEFAULT_KAPPAS,
                        help="kappa values to scan, each 0 < kappa < 1 (default: %(default)s)")
    parser.add_argument("--structures", type=int, default=1000,
                        help="rattled copies of the 105 DFT cells (default 1000); 0: the 105 cells as they are")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="holdout share (default 0.15)")
    parser.add_argument("--functions", type=int, default=100, help="functions per element (default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (datasets, fits)")
    args = parser.parse_args()
    bad = [k for k in args.kappa if not 0.0 < k < 1.0]
    if bad:
        parser.error(f"kappa must lie strictly between 0 and 1, got {bad}")
    if not PACEMAKER.exists():
        sys.exit(f"pacemaker not found at {PACEMAKER}: install python-ace into this venv")

    default_kappa = TrainConfig().kappa
    base = base_config(args.maxiter, args.test_fraction, args.functions)
    root = Path(tempfile.mkdtemp(prefix="bench-kappa-"))
    manifest = build_dataset(root, base, args.structures)
    n_train, n_test = len(manifest.train_ids), len(manifest.test_ids)

    banner(f"kappa scan: holdout errors of the deployed ACE + ZBL + reference calculator, maxiter={args.maxiter}")
    print(machine_line())
    what = "the 105 DFT Cu cells as they are" if args.structures == 0 else \
        f"{args.structures} rattled (0.02 A) copies of the 105 DFT Cu cells"
    print(f"data: {what}; one split for all: {n_train} training, {n_test} holdout structures "
          f"(seed {base.seed}); {args.functions} functions per element, max_degree 4, tensorpot, {THREADS} threads")
    e_scale, f_scale = label_scale(manifest)
    print(f"for scale, holdout labels: energy spread (RMS about the mean) {e_scale:.1f} meV/atom, "
          f"force RMS (a zero-force model's RMSE) {f_scale:.1f} meV/A")
    print(f"TrainConfig default: energy_weight {TrainConfig().energy_weight:g}, "
          f"force_weight {TrainConfig().force_weight:g} -> kappa {default_kappa:.3g}\n")
    print(HEADER)
    print(UNITS, flush=True)
    results = []
    for kappa in args.kappa:
        results.append(fit_and_score(root, manifest, config_for(base, kappa)))
        print(row(results[-1], default_kappa), flush=True)
    done = [r for r in results if not r["failed"]]
    if done:
        best_e = min(done, key=lambda r: r["holdout_e"])
        best_f = min(done, key=lambda r: r["holdout_f"])
        print(f"\nlowest holdout energy RMSE at kappa {best_e['kappa']:g}; lowest force RMSE at kappa {best_f['kappa']:g}")
        gap = max(abs(r["holdout_e"] - r["residual_e"]) for r in done)
        print(f"deployed vs ACE-on-delta-targets, largest energy gap: {gap:.2e} meV/atom (0 when the published "
              "baseline is the one subtracted)")
    if args.keep:
        print(f"\nkept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
