"""The command line's grammar: every command, its options and their defaults.

Light on purpose: ``autopipec-hpc --version`` and ``--help`` import no science stack;
a command's module is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from autopipec_hpc.states import StructureStatus
from autopipec_hpc.templates import DEFAULT_SITE


# -- parser ---------------------------------------------------------------------
class _Version(argparse.Action):
    """argparse's version action, the version read only when asked for (``autopipec_hpc``)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        from autopipec_hpc import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="autopipec-hpc",
        description="DFT-labelled structures in an ASE database -> a validated ACE potential.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (also: AUTOPIPEC_DEBUG=1)")
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="load labelled structures from ASE-readable files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--db", required=True)
    p.add_argument("--status", default=StructureStatus.TRAINING_READY.value)
    p.add_argument("--config-type", default=None, help="override each frame's config_type")
    p.set_defaults(func="cmd_import")

    p = sub.add_parser("example-data", help="write a small EMT copper dataset into a database")
    p.add_argument("--db", required=True)
    p.set_defaults(func="cmd_example_data")

    p = sub.add_parser("prepare", help="build the ZBL-delta train/test datasets")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    p.add_argument("--status", default=StructureStatus.TRAINING_READY.value)
    p.set_defaults(func="cmd_prepare")

    def site_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--site", type=Path, default=DEFAULT_SITE,
                       help="site config YAML (default: the packaged local site, see site-template)")
        p.add_argument("--db", default=None, help="database (default: the site's)")

    p = sub.add_parser("submit", help="prepare datasets, submit training and its evaluation")
    site_args(p)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML")
    p.add_argument("--generation", type=_generation, default=None, help="default: one more than the last")
    p.add_argument("--wait", action="store_true", help="wait for the result and show it")
    p.add_argument("--force", action="store_true", help="retrain a generation that succeeded")
    p.add_argument("--from-generation", type=int, default=None,
                   help="warm start: begin from this published generation's potential")
    p.set_defaults(func="cmd_submit")

    p = sub.add_parser("status", help="generations and their jobs")
    site_args(p)
    p.add_argument("--generation", type=_generation, default=None)
    p.set_defaults(func="cmd_status")

    p = sub.add_parser("results", help="metrics of finished generations")
    site_args(p)
    p.add_argument("--generation", type=_generation, default=None)
    p.add_argument("--common-holdout", action="store_true",
                   help="also evaluate every published generation on the holdout rows they share")
    p.set_defaults(func="cmd_results")

    p = sub.add_parser("cancel", help="cancel a generation's jobs")
    site_args(p)
    p.add_argument("--generation", type=_generation, required=True)
    p.set_defaults(func="cmd_cancel")

    p = sub.add_parser("check-site", help="validate a site config and show what would be submitted")
    p.add_argument("file", type=Path)
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML whose basis size to show")
    p.add_argument("--elements", default="Cu", help="comma-separated elements to count parameters for")
    p.set_defaults(func="cmd_check_site")

    p = sub.add_parser("site-template", help="print a commented site config to copy and edit")
    p.add_argument("--slurm", action="store_true", help="a SLURM GPU cluster instead of this machine")
    p.set_defaults(func="cmd_site_template")

    p = sub.add_parser("demo", help="example data and a quick end-to-end run")
    site_args(p)
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="labelled structures to train on (default: 30 EMT copper cells made on the spot)")
    p.add_argument("--config", type=Path, default=None, help="default: a small quick fit")
    p.add_argument("--loop", type=int, default=None, metavar="K",
                   help="run the active-learning loop for K generations on EMT copper instead "
                        "(own folders: <work_dir>/loop-demo, <output_dir>/loop-demo)")
    p.add_argument("--select", type=int, default=10, help="with --loop: structures to label per generation")
    p.add_argument("--pool", type=int, default=200, help="with --loop: unlabelled candidates to start with")
    p.add_argument("--explore", action="store_true",
                   help="with --loop: no pool; each generation explores with MD (the plan-template plan)")
    p.set_defaults(func="cmd_demo")

    p = sub.add_parser("select", help="score candidates by extrapolation grade; request labels for the best")
    site_args(p)
    p.add_argument("--generation", type=int, required=True, help="the published generation that scores")
    p.add_argument("--max", type=int, default=20, help="structures to choose at most (default 20)")
    p.add_argument("--gamma-min", type=float, default=1.0, help="only candidates above this max gamma (default 1)")
    p.add_argument("--strategy", default="d-optimal", help="d-optimal (default), top-gamma or random")
    p.add_argument("--batch", type=int, default=500, help="candidates read and scored at a time (MaxVol takes them 1,000 at a time)")
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="a budget in atoms (DFT cost follows atoms): stop before the selected atoms exceed it")
    p.add_argument("--again", action="store_true",
                   help="select a generation that was selected already (a second budget of labels)")
    p.add_argument("--out", type=Path, default=None, help="summary folder (default: <output>/selections/gen-N)")
    p.add_argument("--no-wait", action="store_true",
                   help="on a SLURM site: print the select job's id and where its summary will be, and return")
    p.set_defaults(func="cmd_select")

    p = sub.add_parser("explore", help="MD with a published generation; keep the frames it does not know as candidates")
    site_args(p)
    p.add_argument("--generation", type=_generation, required=True, help="the published generation that runs the MD")
    p.add_argument("--plan", type=Path, required=True, help="exploration plan YAML (see plan-template)")
    p.add_argument("--no-wait", action="store_true",
                   help="print the tasks submitted and return; explore again to follow and import them")
    p.set_defaults(func="cmd_explore")

    p = sub.add_parser("plan-template", help="print a commented exploration plan to copy and edit")
    p.set_defaults(func="cmd_plan_template")

    p = sub.add_parser("loop", help="train -> evaluate -> select -> label -> train warm-started, resumable")
    site_args(p)
    p.add_argument("--generations", type=int, required=True, help="stop when this generation is published")
    p.add_argument("--select", type=int, required=True, help="structures to label per generation at most")
    p.add_argument("--labeller", type=Path, default=None,
                   help="labeller.yaml: how each generation's structures are labelled (see labeller-template)")
    p.add_argument("--calculator", default=None,
                   help="instead of --labeller: MODULE:CLASS that labels, e.g. ase.calculators.emt:EMT")
    p.add_argument("--kwargs", default=None, help="the calculator's keyword arguments as a JSON object")
    p.add_argument("--config", type=Path, default=None, help="TrainConfig YAML (warm_start is set by the loop)")
    p.add_argument("--gamma-min", type=float, default=1.0)
    p.add_argument("--strategy", default="d-optimal", help="d-optimal (default), top-gamma or random")
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="a budget in atoms per generation, besides --select (DFT cost follows atoms)")
    p.add_argument("--cold", action="store_true", help="train every generation from scratch")
    p.add_argument("--plan", type=Path, default=None,
                   help="exploration plan YAML: each published generation explores, then selects among what it found")
    p.add_argument("--converge", type=float, default=None,
                   help="with --plan: stop once this share of a generation's explored frames is accurate (e.g. 0.99)")
    p.set_defaults(func="cmd_loop")

    p = sub.add_parser("label", help="label DFT_REQUESTED structures as a job array of the site's scheduler")
    site_args(p)
    p.add_argument("--labeller", type=Path, default=None, help="labeller.yaml (see labeller-template)")
    p.add_argument("--calculator", default=None,
                   help="shortcut for a labeller with default settings: MODULE:CLASS, e.g. ase.calculators.emt:EMT")
    p.add_argument("--kwargs", default=None, help="with --calculator: its keyword arguments as a JSON object")
    p.add_argument("--retry-failed", action="store_true", help="label the LABEL_FAILED structures again too")
    p.add_argument("--no-wait", action="store_true", help="print the array's first task and its folder, and return")
    p.set_defaults(func="cmd_label")

    p = sub.add_parser("labeller-template", help="print a labeller.yaml to start from")
    p.add_argument("--gpaw", action="store_true", help="a GPAW labeller that runs as is (pip install .[dft])")
    p.set_defaults(func="cmd_labeller_template")

    return parser


def _generation(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"generation must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"generation must be 1 or more, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2 like every other one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
