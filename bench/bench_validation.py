"""Issue 18: the validation job's cost against its fit's, and what it finds at production size.

One production-size fit (the demo's: 100 functions per element, 200 iterations on tensorpot,
validation on with the default settings) through the real pipeline (local executor: train,
evaluate, validate, publish), on

- ``--data emt`` (default): the 33 EMT copper cells of the example data, with EMT itself as
  the independent reference computed here with ASE's tools (EquationOfState; elastic constants
  from energy curvatures, not the stresses the validation uses). Targets (issue 18): a0 within
  1 %, B0 within 10 %, C11, C12, C44 within 15 % of EMT's, no fused pair in the hot MD;
- ``--data cu``: the 105 FHI-aims copper structures of ../shared, against their
  ``A1_murnaghan`` rows (the validation's own reference).

Prints the fit's and the validation's wall times, their ratio (target: under 10 % of a
production fit) and the figures; MET / NOT MET per target, never fails on one.

``--raw`` adds the side by side of issue 18: raw pacemaker (its own ``repulsion: auto``, no
delta learning: trained on the DFT energies and forces less the same reference energies)
on the identical split, basis, seed and iteration budget, validated by the same code.

    .venv/bin/python bench/bench_validation.py [--data emt|cu] [--maxiter 200] [--raw] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import CU_DATA  # noqa: E402


def emt_reference() -> dict[str, float]:
    from tests.test_validation import _emt_reference

    a0, b0, c11, c12, c44 = _emt_reference()
    return {"a0": a0, "B0": b0, "C11": c11, "C12": c12, "C44": c44}


def raw_pacemaker(run_dir: Path, config, out: Path):
    """Raw pacemaker on our split: DFT labels (less our reference energies), `repulsion: auto`;
    returns its deployed calculator (its potential + the same reference energies) and fit time."""
    import subprocess

    from ase.calculators.mixing import SumCalculator
    from pyace import PyACECalculator

    from autopipec_hpc.dataset_files import read_pickle, write_pickle
    from autopipec_hpc.dataset_prep import DatasetManifest
    from autopipec_hpc.pacemaker.files import render_input
    from autopipec_hpc.physics import ReferenceEnergyCalculator, per_atom_reference

    manifest = DatasetManifest.load(run_dir / "dataset")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for side, files in (("train", manifest.train_paths), ("test", manifest.test_paths)):
        frames = []
        for path in files:
            df = read_pickle(path)
            refs = [float(per_atom_reference(a, manifest.reference_energies).sum()) for a in df["ase_atoms"]]
            df["energy"] = df["energy_corrected"] = df["energy_dft"] - refs
            df["forces"] = df["forces_dft"]
            frames.append(df)
        import pandas as pd

        paths[side] = out / f"raw-{side}.pckl.gzip"
        write_pickle(pd.concat(frames, ignore_index=True), paths[side])
    text = render_input(config, manifest.elements, [str(paths["train"])], [str(paths["test"])], "tensorpot")
    text = text.replace("  # No `repulsion: auto`: the ZBL baseline is the repulsion, added at deployment.",
                        "  repulsion: auto")
    assert "repulsion: auto" in text
    (out / "input.yaml").write_text(text)
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "pacemaker"), "input.yaml"], cwd=out,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"raw pacemaker failed: {done.stderr[-2000:]}")
    calc = SumCalculator([PyACECalculator(str(out / "output_potential.yaml")),
                          ReferenceEnergyCalculator(manifest.reference_energies)])
    return calc, time.monotonic() - started, manifest


def side_by_side(run_dir: Path, config, out: Path, ours: dict) -> None:
    from autopipec_hpc.validate.reference import ground_states, read_dataset
    from autopipec_hpc.validate.run import validate

    calc, fit_s, manifest = raw_pacemaker(run_dir, config, out)
    states = ground_states(read_dataset([*manifest.train_paths, *manifest.test_paths]), config.validation.eos_reference)
    raw = validate(calc, states, manifest.elements, config.validation, 0, config.cutoff).model_dump()
    print(f"raw pacemaker (repulsion: auto) fit {fit_s:.0f} s; its validation {raw['wall_time_s']:.0f} s")

    def row(report: dict) -> list[str]:
        e, d = report["elements"][0], report["dimers"][0]
        eos = e["eos"] or {}
        f = lambda v, n=3: "-" if v is None else f"{v:.{n}f}"  # noqa: E731
        return [f(eos.get("a0")), f(eos.get("b0_gpa"), 1), f(e["c11_gpa"], 0), f(e["c12_gpa"], 0),
                f(e["c44_gpa"], 0), f(e["vacancy_ev"], 2),
                f"{e['md_temperature_k']:.0f} K {e['md_failure'] or 'stable'}, closest {f(e['md_min_distance'], 2)}",
                f"{f(d['energy_at_check'], 1)} eV at 1 A, first min {f(d['r_min'], 2)}",
                "; ".join(report["failures"]) or "passed"]

    eos = ours["elements"][0]["eos"]
    header = ["", "a0 A", "B0 GPa", "C11", "C12", "C44", "vacancy eV", "hot MD", "dimer", "gate"]
    rows = [[str(eos.get("reference")), f"{eos['ref_a0']:.3f}" if eos.get("ref_a0") else "-",
             f"{eos['ref_b0_gpa']:.1f}" if eos.get("ref_b0_gpa") else "-", "-", "-", "-", "-", "-", "-", "-"],
            ["ours: ACE + ZBL (delta)", *row(ours)], ["raw pacemaker, repulsion: auto", *row(raw)]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("emt", "cu"), default="emt")
    parser.add_argument("--maxiter", type=int, default=200)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    parser.add_argument("--raw", action="store_true", help="also raw pacemaker with repulsion: auto, side by side")
    args = parser.parse_args()

    from autopipec_hpc.config import SiteConfig
    from autopipec_hpc.errors import ValidationRejectedError
    from autopipec_hpc.example_data import demo_train_config, write_example_database
    from autopipec_hpc.generation import Generation
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.submission import submit_generation

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-validation-"))
    root.mkdir(parents=True, exist_ok=True)
    site = SiteConfig(name="bench", work_dir=root / "runs", output_dir=root / "output",
                      database=str(root / "structures.db"),
                      pacemaker={"command": str(Path(sys.executable).parent / "pacemaker"), "evaluator": "tensorpot"},
                      train={"cpus": 2})
    db = DatabaseManager(site.database)
    if args.data == "emt":
        write_example_database(db)
    else:
        if not CU_DATA.is_file():
            sys.exit(f"benchmark data not found: {CU_DATA}")
        db.import_files([CU_DATA])
    config = demo_train_config("tensorpot").model_copy(update={"maxiter": args.maxiter})
    started = time.monotonic()
    sub = submit_generation(site.database, site, config)
    try:
        Generation.open(sub.spec.run_dir).wait(7200)
    except ValidationRejectedError as exc:
        print(f"REJECTED: {exc}")
    total = time.monotonic() - started
    record = Generation.open(sub.spec.run_dir).record()
    report = json.loads((Path(sub.spec.run_dir) / "validation" / "validation.json").read_text())
    fit_s, validation_s = record.wall_time_s, report["wall_time_s"]
    print(f"data {args.data}: {record.status}; fit {fit_s:.0f} s (pacemaker), validation {validation_s:.0f} s, "
          f"whole generation {total:.0f} s")
    ratio = validation_s / fit_s
    print(f"validation / fit = {100 * ratio:.1f} %  (target < 10 % of a production fit: "
          f"{'MET' if ratio < 0.10 else 'NOT MET'})")
    e = report["elements"][0]
    eos = e["eos"]
    ours = {"a0": eos["a0"], "B0": eos["b0_gpa"], "C11": e["c11_gpa"], "C12": e["c12_gpa"], "C44": e["c44_gpa"]}
    if args.data == "emt":
        reference, source = emt_reference(), "EMT (ASE's EOS, energy curvatures)"
    else:
        reference = {"a0": eos["ref_a0"], "B0": eos["ref_b0_gpa"]}
        source = eos["reference"]
    targets = {"a0": 0.01, "B0": 0.10, "C11": 0.15, "C12": 0.15, "C44": 0.15}
    print(f"{'property':10s} {'ours':>10s} {'reference':>10s} {'off %':>7s}   reference: {source}")
    for name, value in ours.items():
        ref = reference.get(name)
        if ref is None or value is None:
            print(f"{name:10s} {value if value is not None else float('nan'):10.3f} {'-':>10s}")
            continue
        off = abs(value / ref - 1)
        print(f"{name:10s} {value:10.3f} {ref:10.3f} {100 * off:7.1f}   "
              f"(target {100 * targets[name]:g} %: {'MET' if off <= targets[name] else 'NOT MET'})")
    print(f"vacancy {e['vacancy_ev']:.2f} eV; hot MD at {e['md_temperature_k']:.0f} K: "
          f"{e['md_failure'] or 'stable'}, closest pair {e['md_min_distance']:.2f} A (fused below "
          f"{e['md_fused_threshold']:.2f}: {'MET' if not e['md_failure'] else 'NOT MET'}), "
          f"NVE drift {e['md_nve_drift_mev_per_atom_ps']} meV/atom/ps")
    for d in report["dimers"]:
        print(f"dimer {d['pair']}: first minimum at {d['r_min']:.2f} A (no closer than {d['min_floor']:.2f}: "
              f"{d['repulsive']}), {d['energy_at_check']:.1f} eV at {d['check_distance']:.2f} A")
    print(f"verdict: {'; '.join(report['failures']) or 'passed'}; folder {root}")
    if args.raw:
        side_by_side(Path(sub.spec.run_dir), config, root / "raw-pacemaker", report)


if __name__ == "__main__":
    main()
