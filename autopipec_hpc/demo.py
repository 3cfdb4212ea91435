"""The ``demo`` command's library: example data (or the user's files) into a database, then
one quick generation, or the active-learning loop on EMT copper in folders of its own.

The command only parses and prints; what is made, where, and in which order is here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autopipec_hpc.active.explore_plan import ExplorePlan, plan_template
from autopipec_hpc.active.loop import LoopSettings, LoopStep, run_loop
from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.errors import ConfigError
from autopipec_hpc.example_data import demo_train_config, write_example_candidates, write_example_database
from autopipec_hpc.preflight import local_evaluator
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.submission import Submission, submit_generation

# The loop demo's folders, under the site's: its generations never mix with the plain demo's.
DEMO_LOOP_DIR = "loop-demo"
# EMT labels the loop's picks, as it labelled the starting data (example_data.py).
DEMO_LABELLER = "ase.calculators.emt:EMT"


def demo_config(site: SiteConfig, config_file: Path | None) -> TrainConfig:
    """``config_file``, or the demo's quick fit on the evaluator this machine would use."""
    if config_file:
        return TrainConfig.from_yaml(config_file)
    return demo_train_config(local_evaluator(site).evaluator)


def seed_demo_database(db: DatabaseManager, data: Sequence[Path] | None) -> str | None:
    """Give an empty database something to train on: ``data`` (labelled files), else the
    33 EMT copper cells. Returns what was written, or None if it had ready rows already."""
    if db.count(status=StructureStatus.TRAINING_READY):
        return None
    if data:
        n = db.import_files(list(data), status=StructureStatus.TRAINING_READY)
        return f"imported {n} structures from {', '.join(map(str, data))} into {db.target}"
    n = write_example_database(db)
    return f"wrote {n} example copper structures (EMT labels) into {db.target}"


def submit_demo(site: SiteConfig, database: str | None, data: Sequence[Path] | None, config_file: Path | None,
                notify: Callable[[str], None] | None = None) -> Submission:
    """The plain demo: seed the site's database (or ``database``), submit one generation."""
    say = notify or (lambda message: None)
    config = demo_config(site, config_file)
    db = DatabaseManager(database or site.database)
    seeded = seed_demo_database(db, data)
    if seeded:
        say(seeded)
    return submit_generation(db.target, site, config, None, force=False, notify=say)


@dataclass(frozen=True)
class DemoLoop:
    """``demo --loop K``'s options, checked once, by the options' names, before anything is written."""

    generations: int  # --loop
    select: int = 10
    pool: int = 200
    data: Sequence[Path] | None = None
    explore: bool = False  # --explore: each generation explores (the template plan) instead of a pool
    settings: LoopSettings = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise ConfigError(f"--loop must be at least 1 generation, got {self.generations}")
        if self.pool < 1:
            raise ConfigError(f"--pool must be at least 1 candidate, got {self.pool}")
        object.__setattr__(self, "settings", LoopSettings(generations=self.generations, select=self.select,
                                                          calculator=DEMO_LABELLER, plan=demo_plan() if self.explore
                                                          else None))
        if self.data:
            raise ConfigError("--data cannot go with --loop: the loop labels its picks with EMT, "
                              "which must also have labelled the starting data")


def demo_loop_site(site: SiteConfig) -> SiteConfig:
    """The site with its work and output folders moved into ``loop-demo`` subfolders."""
    return site.model_copy(update={"work_dir": site.work_dir / DEMO_LOOP_DIR,
                                   "output_dir": site.output_dir / DEMO_LOOP_DIR})


def demo_plan() -> ExplorePlan:
    """The exploration of ``demo --loop K --explore``: the plan ``plan-template`` prints."""
    return ExplorePlan.model_validate(yaml.safe_load(plan_template()))


def seed_demo_loop_database(db: DatabaseManager, pool: int) -> str | None:
    """An empty database gets the 33 labelled cells and ``pool`` unlabelled candidates
    (imbalanced, as MD harvests are; none when the loop explores); returns what was
    written, or None if it had rows."""
    if db.count():
        return None  # a rerun: the loop resumes on what is there
    n = write_example_database(db)
    if not pool:
        return f"wrote {n} example copper structures (EMT labels) into {db.target}"
    m = write_example_candidates(db, pool)
    return f"wrote {n} example copper structures (EMT labels) and {m} unlabelled candidates into {db.target}"


@dataclass(frozen=True)
class DemoLoopRun:
    db: DatabaseManager
    steps: list[LoopStep]


def run_demo_loop(site: SiteConfig, database: str | None, demo: DemoLoop, config_file: Path | None,
                  notify: Callable[[str], None] | None = None) -> DemoLoopRun:
    """The active-learning loop on the example data in its own folders (``demo_loop_site``);
    run again, it resumes (or finds it done)."""
    say = notify or (lambda message: None)
    site = demo_loop_site(site)
    config = demo_config(site, config_file)  # a bad --config is named before anything is written
    db = DatabaseManager(database or str(site.output_dir / "structures.db"))  # a refused URL: before any folder
    site.output_dir.mkdir(parents=True, exist_ok=True)
    seeded = seed_demo_loop_database(db, 0 if demo.explore else demo.pool)
    if seeded:
        say(seeded)
    steps = run_loop(site, db, config, demo.settings, notify=say)
    return DemoLoopRun(db, steps)
