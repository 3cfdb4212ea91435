"""How often following a generation on SLURM runs `sacct`: the code here against the code
of the last commit (`git archive HEAD`, run from a temporary copy).

Needs the CI cluster (`bash scripts/slurm/up.sh`) and pacemaker. Each implementation
submits one real pacemaker fit (tiny basis, pyace evaluator, 100,000 iterations: it runs
far longer than the window) and follows it with its own `wait_for_generation` for
``--window`` seconds, with a counting `sacct` shim first on PATH (it appends a line to a
file, then execs the real sacct). The fit is cancelled afterwards; the cancel's calls are
not counted.

    .venv/bin/python bench/bench_sacct_calls.py --window 240 --old-window 60

Prints, per implementation: sacct calls, wall seconds, calls per 10 minutes. Scaling to
10 minutes: the old code polls at a fixed 1 s (two sacct per poll), so its rate is
linear; the new watcher's delays double up to 60 s and stay there while nothing
changes, so after the window every further minute costs exactly one call:
calls(600 s) = calls(window) + ceil((600 - window) / 60). The new code's record and
progress-line staleness (seconds between a change and the waiter seeing it) is
measured too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_SACCT = shutil.which("sacct") or "/usr/bin/sacct"
TEN_MINUTES = 600.0
MAX_DELAY_S = 60.0

CHILD = r'''
import json, sys, time
from pathlib import Path
root, window, count_file = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
import autopipec_hpc
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.example_data import tiny_train_config, write_example_database
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import SchedulerError
from autopipec_hpc import generation as gen_module
from autopipec_hpc.submission import submit_generation

base = SiteConfig.from_yaml(sys.argv[4]).model_dump(mode="json")
base.update(work_dir=str(root / "runs"), output_dir=str(root / "output"), database=str(root / "structures.db"))
base["pacemaker"] = {**base["pacemaker"], "evaluator": "pyace"}
site = SiteConfig.model_validate(base)
write_example_database(DatabaseManager(site.database))
sub = submit_generation(site.database, site, tiny_train_config().model_copy(update={"maxiter": 100000}))
run = Path(sub.spec.run_dir)
db = DatabaseManager(site.database)
lags = {"record": [], "progress": []}
# Staleness of what the waiter shows: a progress line as it is printed, and the record
# status as the waiter reads it (wrapped here; the waiter itself is unchanged).
def on_progress(current):
    lags["progress"].append(time.time() - current.progress.updated_at)
original_get = DatabaseManager.get_record
last = {}
def timed_get(self, generation):
    record = original_get(self, generation)
    if record is not None and last.get("status") != record.status:
        last["status"] = record.status
        lags["record"].append(time.time() - float(record.values.get("updated", time.time())))
    return record
DatabaseManager.get_record = timed_get
def calls():
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0
before, start = calls(), time.monotonic()
try:
    gen_module.wait_for_generation(run, window, on_progress=on_progress)
except SchedulerError:
    pass  # the window ended, the fit still runs
wall, counted = time.monotonic() - start, calls() - before
DatabaseManager.get_record = original_get
gen_module.cancel_generation(run)
print(json.dumps({"module": autopipec_hpc.__file__, "calls": counted, "wall_s": wall,
                  "record_lag_s": max(lags["record"], default=None),
                  "progress_lag_s": max(lags["progress"], default=None),
                  "progress_lines": len(lags["progress"])}))
'''


def old_copy(into: Path) -> Path:
    """The last commit's package, with its packaged templates and site configs, in ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "autopipec_hpc", "job_templates", "site_configs"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.move(str(into / "job_templates"), str(into / "autopipec_hpc" / "job_templates"))
    shutil.move(str(into / "site_configs"), str(into / "autopipec_hpc" / "site_configs"))
    return into


def measure(label: str, pythonpath: Path, window: float, work: Path) -> dict:
    shim_dir, count = work / "shim", work / "sacct.calls"
    shim_dir.mkdir(parents=True)
    shim = shim_dir / "sacct"
    shim.write_text(f'#!/bin/sh\necho "$$ $*" >> {count}\nexec {REAL_SACCT} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}", "PYTHONPATH": str(pythonpath)}
    site = ROOT / "site_configs" / "slurm-ci.yaml"
    done = subprocess.run([sys.executable, "-c", CHILD, str(work), str(window), str(count), str(site)],
                          env=env, capture_output=True, text=True, timeout=window + 900, cwd=work)
    if done.returncode != 0:
        sys.exit(f"{label}: the measurement failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["label"] = label
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=TEN_MINUTES, help="seconds the new code follows the fit")
    parser.add_argument("--old-window", type=float, default=60.0, help="seconds the old code follows it (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sacct-") as tmp:
        tmp_path = Path(tmp)
        results = []
        if args.old_window > 0:
            old = old_copy(tmp_path / "old-code")
            results.append(measure("old (HEAD)", old, args.old_window, tmp_path / "old"))
        results.append(measure("new (working tree)", ROOT, args.window, tmp_path / "new"))
    print(f"{'code':<20} {'sacct calls':>11} {'wall s':>8} {'calls / 10 min':>15}  how scaled")
    for r in results:
        if r["label"].startswith("old"):
            per_ten = r["calls"] / r["wall_s"] * TEN_MINUTES
            how = "linear (fixed 1 s poll)"
        else:
            extra = max(0, math.ceil((TEN_MINUTES - r["wall_s"]) / MAX_DELAY_S))
            per_ten = r["calls"] + extra
            how = f"measured + {extra} (one per {MAX_DELAY_S:.0f} s after the window)" if extra else "measured"
        print(f"{r['label']:<20} {r['calls']:>11} {r['wall_s']:>8.1f} {per_ten:>15.0f}  {how}; code {r['module']}")
        if r["record_lag_s"] is not None:
            print(f"{'':<20} record seen at most {r['record_lag_s']:.1f} s after it changed; "
                  f"{r['progress_lines']} progress lines, each at most {r['progress_lag_s'] or 0:.1f} s old")


if __name__ == "__main__":
    main()
