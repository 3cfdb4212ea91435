"""A real-DFT active-learning loop: 3 generations on Al, every label computed by GPAW in label arrays.

4-atom fcc Al cells (near equilibrium, strained, hot), PBE, plane waves 200 eV, Gamma
point (`labeller-template --gpaw`). The starting cells are labelled through `label` (so
they carry the level of theory too); the loop (`run_loop`) then trains, selects from a
pool of unlabelled cells, labels the selection as a local label array (2 tasks) and trains
warm-started, up to generation 3. After every generation: the labels it added (labelled /
failed), and the holdout errors of the deployed potential (ACE + ZBL + reference energies)
against GPAW on cells never trained on.

    .venv/bin/python bench/bench_label_loop.py [--start 30] [--pool 60] [--select 6] [--maxiter 100]

About 10 minutes on 2 cores. Needs `pip install -e .[dft]` and pacemaker (README: Installing).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from ase.build import bulk  # noqa: E402

from autopipec_hpc.active.label_array import run_labels  # noqa: E402
from autopipec_hpc.active.labeller_config import LabellerConfig, labeller_template  # noqa: E402
from autopipec_hpc.active.loop import LoopSettings, run_loop  # noqa: E402
from autopipec_hpc.config import SiteConfig  # noqa: E402
from autopipec_hpc.example_data import demo_train_config  # noqa: E402
from autopipec_hpc.store import DatabaseManager  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import holdout_errors  # noqa: E402

KINDS = ("equilibrium", "strained", "hot")


def cell(kind: str, rng: np.random.Generator):
    seed = int(rng.integers(1 << 30))
    if kind == "equilibrium":
        atoms = bulk("Al", "fcc", a=4.04 * rng.uniform(0.99, 1.01), cubic=True)
        atoms.rattle(0.03, seed=seed)
    elif kind == "strained":
        atoms = bulk("Al", "fcc", a=4.04, cubic=True)
        atoms.set_cell(atoms.cell * rng.uniform(0.94, 1.06, 3), scale_atoms=True)
        atoms.rattle(0.05, seed=seed)
    else:
        atoms = bulk("Al", "fcc", a=4.04 * rng.uniform(1.0, 1.02), cubic=True)
        atoms.rattle(rng.uniform(0.15, 0.25), seed=seed)
    return atoms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 4 atoms each: at least --functions environments, or pace_activeset cannot make the active set
    parser.add_argument("--start", type=int, default=30)
    parser.add_argument("--pool", type=int, default=60)
    parser.add_argument("--holdout", type=int, default=12)
    parser.add_argument("--select", type=int, default=6)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--maxiter", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    t0 = time.monotonic()
    rng = np.random.default_rng(args.seed)
    labeller = LabellerConfig.model_validate(yaml.safe_load(labeller_template(gpaw=True)))
    labeller = labeller.model_copy(update={"structures_per_task": max(1, -(-args.select // 2))})
    root = Path(tempfile.mkdtemp(prefix="bench-label-loop-"))
    site = SiteConfig(name="bench-gpaw", scheduler="local", work_dir=root / "runs", output_dir=root / "output",
                      database=str(root / "structures.db"), pacemaker={"command": "pacemaker", "evaluator": "auto"},
                      train={"cpus": 2})
    db = DatabaseManager(site.database)

    holdout = []
    for k in range(args.holdout):
        atoms = cell(KINDS[k % len(KINDS)], rng)
        atoms.calc = labeller.make_calculator()
        holdout.append((atoms, float(atoms.get_potential_energy()), atoms.get_forces().copy()))
    start = [db.add_candidate(cell(KINDS[k % len(KINDS)], rng), KINDS[k % len(KINDS)]) for k in range(args.start)]
    db.update_rows([(i, {"status": "DFT_REQUESTED"}) for i in start])
    first = run_labels(site, db, labeller, timeout_s=3600)
    for k in range(args.pool):
        db.add_candidate(cell(KINDS[k % len(KINDS)], rng), KINDS[k % len(KINDS)])
    print(f"holdout {len(holdout)} GPAW cells; start: {first.describe()}; pool {args.pool}  "
          f"[{time.monotonic() - t0:.0f} s]", flush=True)

    config = demo_train_config().model_copy(update={"b_basis_size": args.functions, "maxiter": args.maxiter,
                                                    "seed": args.seed})
    labeller_file = root / "labeller.yaml"
    labeller_file.write_text(yaml.safe_dump(labeller.model_dump(mode="json")))
    settings = LoopSettings(generations=3, select=args.select, labeller_file=labeller_file, gamma_min=0.0)
    said: list[str] = []
    run_loop(site, db, config, settings, timeout_s=3600, notify=lambda m: (said.append(m), print(m, flush=True)))
    print(f"\nloop done [{time.monotonic() - t0:.0f} s]\n")
    print(f"{'gen':>3} {'trained on':>10} {'E RMSE meV/at':>14} {'F RMSE meV/A':>13}   labels added after it")
    label_lines = [m for m in said if m.startswith("loop: labels of generation")]
    for g in range(1, 4):
        record = db.get_record(g)
        e, f = holdout_errors(Path(record.potential_path), holdout)[:2]
        added = next((m.split(": ", 2)[2] for m in label_lines if f"generation {g}:" in m), "-")
        print(f"{g:>3} {record.values['n_train'] + record.values['n_test']:>10} {e:>14.2f} {f:>13.1f}   {added}")
    levels = {(r.get("labeller"), r.get("labeller_hash")) for r in db.iter_rows(status="TRAINING_READY")}
    print(f"levels of theory among the training rows: {sorted(levels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
