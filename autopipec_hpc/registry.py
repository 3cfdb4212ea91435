"""Published potentials: ``output/potentials/<generation>/``, complete or absent.

A generation is assembled in a hidden staging folder beside its final place
and renamed into place in one step, so a reader never sees a partial
potential. ``load_calculator`` turns a published folder into the deployed
model: ACE + ZBL + reference energies, as one ASE calculator.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations_with_replacement
from pathlib import Path

from ase.calculators.mixing import SumCalculator
from ase.data import atomic_numbers

from autopipec_hpc.config import resolve_command
from autopipec_hpc.errors import PublicationError, one_line
from autopipec_hpc.physics import ReferenceEnergyCalculator, ZBLCalculator
from autopipec_hpc.processes import run_child

POTENTIAL_YAML = "potential.yaml"
POTENTIAL_YACE = "potential.yace"
ACTIVE_SET = "potential.asi"
LAMMPS_SNIPPET = "lammps.in"
LAMMPS_EXTRAPOLATION = "lammps_extrapolation.in"  # MD that harvests extrapolative frames (needs the active set)
EXTRAPOLATION_DUMP = "extrapolative_structures.dump"
GAMMA_WRITE = 5.0  # pacemaker's customary thresholds: frames above this are written,
GAMMA_STOP = 25.0  # and the run stops above this
MANIFEST = "potential.json"
REFERENCE_ENERGIES = "reference_energies.json"
# Written beside the potential by the evaluation job (and kept in the run folder's evaluation/).
METRICS = "metrics.json"
PARITY_PLOT = "parity.png"
LEARNING_CURVE_PLOT = "learning_curve.png"
EVALUATION_FILES = (METRICS, PARITY_PLOT, LEARNING_CURVE_PLOT)
TRAINING_INPUT = "input.yaml"  # a copy of the pacemaker input the potential was fitted with


@dataclass(frozen=True)
class PotentialManifest:
    generation: int
    elements: list[str]
    zbl_inner: float
    zbl_outer: float
    reference_energies: dict[str, float]
    files: list[str]
    published_at: float
    # Software that made it; None in manifests written before these were recorded.
    autopipec_hpc_version: str | None = None
    pacemaker_version: str | None = None  # the python-ace distribution; None if not installed
    parent_generation: int | None = None  # the generation a warm start began from; None: a cold start


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def potentials_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "potentials"


def lammps_snippet(elements: Sequence[str], inner: float, outer: float, generation: int) -> str:
    """pair_style lines for LAMMPS: ACE plus the exact ZBL baseline it was trained against."""
    lines = [
        f"# autopipec-hpc generation {generation}: V = V_ACE + V_ZBL (+ constant reference energies,",
        "# see potential.json; they shift total energies only, never forces).",
        f"# Atom types 1..{len(elements)} are {' '.join(elements)}.",
        f"pair_style hybrid/overlay pace zbl {inner} {outer}",
        f"pair_coeff * * pace {POTENTIAL_YACE} {' '.join(elements)}",
    ]
    for (i, a), (j, b) in combinations_with_replacement(enumerate(elements, start=1), 2):
        lines.append(f"pair_coeff {i} {j} zbl {atomic_numbers[a]} {atomic_numbers[b]}")
    return "\n".join(lines) + "\n"


def lammps_extrapolation_snippet(
    elements: Sequence[str], inner: float, outer: float, generation: int,
    gamma_write: float = GAMMA_WRITE, gamma_stop: float = GAMMA_STOP, every: int = 20,
) -> str:
    """LAMMPS lines for exploration with ``pair_style pace/extrapolation``: the same model as
    lammps.in (ACE from the B-basis YAML + the exact ZBL), plus the extrapolation grade gamma
    from the active set; frames whose largest gamma exceeds ``gamma_write`` are dumped as new
    candidates, the run halts above ``gamma_stop``."""
    lines = [
        f"# autopipec-hpc generation {generation}: exploration with extrapolation grades (pacemaker's",
        f"# pace/extrapolation reads the B-basis {POTENTIAL_YAML} and the active set {ACTIVE_SET}).",
        f"# Atom types 1..{len(elements)} are {' '.join(elements)}. Frames with max gamma > {gamma_write:g} go to",
        f"# {EXTRAPOLATION_DUMP} (import them: autopipec-hpc import --status CANDIDATE); the run stops above {gamma_stop:g}.",
        "# Needs a LAMMPS built with ML-PACE that includes the fix of LAMMPS PR #3966: before it,",
        "# pace/extrapolation reads gamma 0 for every atom, so nothing is dumped and nothing halts.",
        f"pair_style hybrid/overlay pace/extrapolation zbl {inner} {outer}",
        f"pair_coeff * * pace/extrapolation {POTENTIAL_YAML} {ACTIVE_SET} {' '.join(elements)}",
    ]
    for (i, a), (j, b) in combinations_with_replacement(enumerate(elements, start=1), 2):
        lines.append(f"pair_coeff {i} {j} zbl {atomic_numbers[a]} {atomic_numbers[b]}")
    lines += [
        f"fix pace_gamma all pair {every} pace/extrapolation gamma 1",
        "compute max_pace_gamma all reduce max f_pace_gamma",
        f'variable dump_skip equal "c_max_pace_gamma < {gamma_write:g}"',
        f"dump pace_dump all custom {every} {EXTRAPOLATION_DUMP} id type x y z f_pace_gamma",
        "dump_modify pace_dump skip v_dump_skip",
        "variable max_pace_gamma equal c_max_pace_gamma",
        f"fix extreme_extrapolation all halt {every} v_max_pace_gamma > {gamma_stop:g}",
    ]
    return "\n".join(lines) + "\n"


def _tool(pacemaker_command: str, name: str) -> str:
    """pacemaker's companion tools live beside it (same environment)."""
    resolved = resolve_command(pacemaker_command)
    if Path(resolved).exists():
        sibling = Path(resolved).parent / name
        if sibling.exists():
            return str(sibling)
    found = shutil.which(name)
    if not found:
        raise PublicationError(f"{name} not found beside {pacemaker_command!r} or on PATH")
    return found


def _run_tool(args: list[str], cwd: Path) -> None:
    # In its own process group, which a stop of the job ends (processes.run_child).
    done = run_child(args, cwd=cwd, timeout_s=3600)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise PublicationError(f"{Path(args[0]).name} failed (exit {done.returncode}):\n{tail}")


def stage_potential(
    staging: Path,
    potential_yaml: Path,
    fitting_data: Path | None,
    elements: Sequence[str],
    zbl_inner: float,
    zbl_outer: float,
    reference_energies: Mapping[str, float],
    generation: int,
    pacemaker_command: str,
    parent_generation: int | None = None,
) -> PotentialManifest:
    """Write the deployable files of one potential into ``staging``."""
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(potential_yaml, staging / POTENTIAL_YAML)
    _run_tool([_tool(pacemaker_command, "pace_yaml2yace"), POTENTIAL_YAML, "-o", POTENTIAL_YACE], staging)
    files = [POTENTIAL_YAML, POTENTIAL_YACE]
    if fitting_data is not None and fitting_data.exists():
        _run_tool([_tool(pacemaker_command, "pace_activeset"), POTENTIAL_YAML, "-d", str(fitting_data)], staging)
        if (staging / ACTIVE_SET).exists():
            files.append(ACTIVE_SET)
            (staging / LAMMPS_EXTRAPOLATION).write_text(
                lammps_extrapolation_snippet(elements, zbl_inner, zbl_outer, generation))
            files.append(LAMMPS_EXTRAPOLATION)
    (staging / LAMMPS_SNIPPET).write_text(lammps_snippet(elements, zbl_inner, zbl_outer, generation))
    (staging / REFERENCE_ENERGIES).write_text(json.dumps(dict(reference_energies), indent=2))
    files += [LAMMPS_SNIPPET, REFERENCE_ENERGIES]
    manifest = PotentialManifest(
        generation=generation,
        elements=list(elements),
        zbl_inner=zbl_inner,
        zbl_outer=zbl_outer,
        reference_energies=dict(reference_energies),
        files=files,
        published_at=time.time(),
        autopipec_hpc_version=installed_version("autopipec-hpc"),
        pacemaker_version=installed_version("python-ace"),
        parent_generation=parent_generation,
    )
    (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
    return manifest


def new_staging_dir(output_dir: str | Path, generation: int) -> Path:
    root = potentials_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".staging-{generation}-"))


def publish(staging: Path, output_dir: str | Path, generation: int, force: bool = False) -> Path:
    """Rename ``staging`` to ``potentials/<generation>``; a published one is kept unless ``force``."""
    final = potentials_root(output_dir) / str(generation)
    staging.chmod(0o755)
    if final.exists():
        if not force:
            shutil.rmtree(staging, ignore_errors=True)
            raise PublicationError(f"generation {generation} is already published at {final}")
        retired = final.with_name(f".replaced-{generation}-{int(time.time())}")
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)
    return final


def validating_dir(output_dir: str | Path, generation: int, run_dir: str | Path) -> Path:
    """Where an evaluated potential waits for its validation job (hidden beside the published
    ones, so its publication is one rename); named after its run folder, so a rerun's never
    meets it."""
    return potentials_root(output_dir) / f".validating-{generation}-{Path(run_dir).name}"


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def read_manifest(directory: str | Path) -> PotentialManifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise PublicationError(f"{directory} holds no published potential ({MANIFEST} missing)")
    try:
        return PotentialManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # truncated, garbage, or keys of another shape
        raise PublicationError(f"{path}: not a potential manifest ({one_line(exc)[:160]})") from None


def load_calculator(directory: str | Path, active_set: bool = False) -> SumCalculator:
    """The deployed model of a published (or staged) potential as one ASE calculator. With
    ``active_set``, its ACE part (the first) carries ``potential.asi``: each evaluation then
    leaves the per-atom extrapolation grade in that part's ``results["gamma"]``, at about
    1 % more time (MD that watches gamma: active/explore.py)."""
    from pyace import PyACECalculator

    manifest = read_manifest(directory)
    ace = PyACECalculator(str(Path(directory) / POTENTIAL_YAML))
    if active_set:
        ace.set_active_set(str(Path(directory) / ACTIVE_SET))
    return SumCalculator(
        [
            ace,
            ZBLCalculator(manifest.zbl_inner, manifest.zbl_outer),
            ReferenceEnergyCalculator(manifest.reference_energies),
        ]
    )
