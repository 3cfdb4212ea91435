"""Warm start vs cold fit, in the loop's terms: wall time and holdout error on real DFT copper.

Run from the project root (needs ../shared/data/cu_fhiaims_105.extxyz, read in place):

    .venv/bin/python bench/bench_warm_start.py            # 3 fits of 500 iterations: ~10-20 min on 2 cores
    .venv/bin/python bench/bench_warm_start.py --before   # also the warm starts of the loop before

What the loop does, with the project's own stages: the 105 FHI-aims Cu cells are split
once into a fixed holdout (every 4th cell of each config type, never trained on) and a
pool. Generation 1 is a cold fit on part of the pool; after "labelling", generation 2
has the whole pool (about 40 % more structures). Each generation's dataset comes from
``DatasetBuilder`` with the settings the loop derives (ZBL delta targets, its own
stratified test split, whose loss pacemaker's early stopping watches; generation 2 keeps
generation 1's sides and its reference energies, as ``warm_start.check_warm_start``
does). Generation 2 is fitted twice on the same dataset: warm (pacemaker ``-p`` from
generation 1's potential, staged by ``warm_start.stage_parent_potential``) and cold.

Fits: the default ``TrainConfig`` (100 functions per element, kappa 0.3, maxiter 500,
early stopping on; a warm start runs at most ``warm_start_maxiter``, 150 iterations, as a
training job runs it) run by ``PacemakerWrapper.run_training`` (tensorpot, 2 threads), as a
training job runs it. Scored as the evaluation job scores: ``registry.stage_potential``
then ``evaluation.evaluate`` with the deployed calculator (ACE + ZBL + reference
energies) against the raw DFT labels of the fixed holdout. The wall time is the whole
pacemaker run (start-up, data, fit, predictions), what a generation waits for.

The machine is shared: quote the ratio warm / cold, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, cu_structures, machine_line, verdict  # noqa: E402

from autopipec_hpc import evaluation, registry  # noqa: E402
from autopipec_hpc.config import TrainConfig  # noqa: E402
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetManifest  # noqa: E402
from autopipec_hpc.pacemaker.run import PacemakerWrapper  # noqa: E402
from autopipec_hpc.submission import dataset_settings  # noqa: E402
from autopipec_hpc.warm_start import Parent, stage_parent_potential  # noqa: E402

PACEMAKER = Path(sys.executable).parent / "pacemaker"
THREADS = 2


@dataclass
class Fit:
    name: str
    wall_s: float
    iterations: int
    stopped_early: bool
    holdout_e: float
    holdout_f: float
    staging: Path


def split_cells(structures, holdout_every: int, first_share: float):
    """Fixed holdout (every ``holdout_every``-th cell of each config type), generation 1's
    cells (the first ``first_share`` of each type's rest) and the cells labelled after it."""
    by_type: dict[str, list] = {}
    for k, atoms in enumerate(structures, start=1):
        atoms.info["db_id"] = k
        by_type.setdefault(str(atoms.info.get("config_type", "default")), []).append(atoms)
    holdout, first, later = [], [], []
    for cells in by_type.values():
        rest = []
        for k, atoms in enumerate(cells):
            (holdout if k % holdout_every == holdout_every - 1 else rest).append(atoms)
        n_first = max(1, round(first_share * len(rest)))
        first += rest[:n_first]
        later += rest[n_first:]
    return holdout, first, later


def fit(root: Path, name: str, manifest: DatasetManifest, config: TrainConfig, holdout_files: list[Path],
        initial: Path | None = None) -> Fit:
    from pyace import PyACECalculator

    wrapper = PacemakerWrapper(command=str(PACEMAKER), evaluator="tensorpot", threads=THREADS)
    with open(root / f"{name}.log", "w") as log, contextlib.redirect_stderr(log):
        result = wrapper.run_training(manifest.train_paths, manifest.test_paths, config, run_dir=root / name,
                                      elements=manifest.elements, initial_potential=initial)
    staging = root / f"potential-{name}"
    registry.stage_potential(staging, Path(result.potential), None, manifest.elements, manifest.zbl_inner,
                             manifest.zbl_outer, manifest.reference_energies, 0, str(PACEMAKER))
    report, _ = evaluation.evaluate(holdout_files, PyACECalculator(str(staging / registry.POTENTIAL_YAML)),
                                    registry.load_calculator(staging))
    return Fit(name, result.wall_time_s, result.iterations, result.stopped_early,
               report.total.energy_rmse_mev, report.total.force_rmse_mev, staging)


def show(f: Fit, maxiter: int) -> None:
    stop = "early stop" if f.stopped_early else "ran maxiter" if f.iterations >= maxiter else ""
    print(f"{f.name:<28} {f.wall_s:>8.1f} {f.iterations:>6d} {stop:>11} {f.holdout_e:>10.2f} {f.holdout_f:>10.2f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maxiter", type=int, default=TrainConfig().maxiter,
                        help="pacemaker iterations per fit (default: TrainConfig's, the loop's)")
    parser.add_argument("--functions", type=int, default=TrainConfig().b_basis_size,
                        help="functions per element (default: TrainConfig's)")
    parser.add_argument("--before", action="store_true",
                        help="also the warm starts the loop ran before: all of maxiter with early stopping, "
                             "and without")
    parser.add_argument("--budgets", type=int, nargs="*", default=[],
                        help="also warm starts of at most these many iterations (warm_start_maxiter)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (datasets, fits)")
    args = parser.parse_args()
    if not PACEMAKER.exists():
        sys.exit(f"pacemaker not found at {PACEMAKER}: install python-ace into this venv")

    config = TrainConfig(maxiter=args.maxiter, b_basis_size=args.functions)
    holdout, first, later = split_cells(cu_structures(), holdout_every=4, first_share=0.7)
    root = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    builder = DatasetBuilder(dataset_settings(config))
    gen1 = builder.prepare_dataset(first, root / "dataset-1")
    # Generation 2: the rows keep the sides generation 1 gave them, and the parent's reference energies.
    sides = {i: "test" for i in gen1.test_ids} | {i: "train" for i in gen1.train_ids}
    for atoms in first:
        atoms.info["split"] = sides.get(atoms.info["db_id"])
    warm_config = config.model_copy(update={"reference_energies": gen1.reference_energies})
    gen2 = DatasetBuilder(dataset_settings(warm_config)).prepare_dataset(first + later, root / "dataset-2")
    held = DatasetBuilder(dataset_settings(warm_config.model_copy(update={"test_fraction": 0.0}))) \
        .prepare_dataset(holdout, root / "holdout")

    banner(f"warm start vs cold fit on real DFT Cu: {args.functions} functions, maxiter {args.maxiter}, "
           f"kappa {config.kappa:g}")
    print(machine_line())
    stop = (f"early stopping: test loss improving by less than {config.early_stopping_min_improvement:g}/iteration "
            f"for {config.early_stopping_patience} iterations" if config.early_stopping_min_improvement else
            "early stopping off")
    print(f"generation 1: {len(gen1.train_ids)} train + {len(gen1.test_ids)} test; generation 2: "
          f"{len(gen2.train_ids)} train + {len(gen2.test_ids)} test; fixed holdout {len(held.train_ids)} cells; {stop}")
    print(f"warm start: at most {config.warm_start_budget} iterations (warm_start_maxiter {config.warm_start_maxiter})")
    print(f"\n{'fit':<28} {'wall s':>8} {'iters':>6} {'':>11} {'holdout E':>10} {'holdout F':>10}")
    print(f"{'':<28} {'':>8} {'':>6} {'':>11} {'meV/atom':>10} {'meV/A':>10}", flush=True)
    t0 = time.perf_counter()
    cold1 = fit(root, "gen1-cold", gen1, config, held.train_paths)
    show(cold1, args.maxiter)
    parent_yaml = stage_parent_potential(Parent(1, cold1.staging, registry.read_manifest(cold1.staging)),
                                         root / "parent.yaml")
    # As a training job runs a warm start (jobs.TrainJob): a share of maxiter.
    capped = warm_config.model_copy(update={"maxiter": warm_config.warm_start_budget})
    warm = fit(root, "gen2-warm", gen2, capped, held.train_paths, initial=parent_yaml)
    show(warm, capped.maxiter)
    cold2 = fit(root, "gen2-cold", gen2, warm_config, held.train_paths)
    show(cold2, args.maxiter)
    before = []
    for budget in args.budgets:
        other = warm_config.model_copy(update={"maxiter": min(budget, warm_config.maxiter)})
        before.append(fit(root, f"gen2-warm-{other.maxiter}-iterations", gen2, other, held.train_paths,
                          initial=parent_yaml))
        show(before[-1], other.maxiter)
    if args.before:
        off = warm_config.model_copy(update={"early_stopping_min_improvement": None})
        for name, config_before in (("gen2-warm-all-of-maxiter", warm_config), ("gen2-warm-no-early-stopping", off)):
            before.append(fit(root, name, gen2, config_before, held.train_paths, initial=parent_yaml))
            show(before[-1], args.maxiter)

    ratio = warm.wall_s / cold2.wall_s
    no_worse = warm.holdout_e <= cold2.holdout_e and warm.holdout_f <= cold2.holdout_f
    print(f"\nwarm / cold wall time on generation 2's data: {warm.wall_s:.1f} / {cold2.wall_s:.1f} s = "
          f"{ratio:.2f}x; target <= 0.5x: {verdict(ratio <= 0.5)}")
    print(f"holdout warm vs cold: E {warm.holdout_e:.2f} vs {cold2.holdout_e:.2f} meV/atom, F {warm.holdout_f:.2f} "
          f"vs {cold2.holdout_f:.2f} meV/A; equal or better: {verdict(no_worse)}")
    for earlier in before:
        print(f"{earlier.name}: {earlier.wall_s:.1f} s = {earlier.wall_s / cold2.wall_s:.2f}x the cold fit; "
              f"holdout E {earlier.holdout_e:.2f}, F {earlier.holdout_f:.2f}")
    print(f"all fits: {time.perf_counter() - t0:.0f} s")
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
