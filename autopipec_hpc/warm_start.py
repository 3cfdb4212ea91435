"""Warm starts: a generation's fit begins from a published generation's potential.

pacemaker's ``-p potential.yaml`` starts from that potential's basis and
coefficients; the dataset is the full current one, built with the parent's
reference energies and ZBL cutoffs, so the parent's coefficients fit the same
targets. Everything is checked before anything is written: a parent that is
not published, or whose elements, ZBL cutoffs, reference energies or basis
differ, is refused by name.

pacemaker's trap: a potential's metadata carries the reference energies it was
fitted with, and pacemaker takes them as ``data.reference_energy`` when the input
has none. Our input always says ``reference_energy: 0`` (the target is already in
``energy``), and the copy we start from has that metadata removed as well, so the
targets trained on are exactly ours (tests/test_active_learning.py checks
pacemaker's own fitting_data_info).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from ase.data import chemical_symbols

from autopipec_hpc import registry
from autopipec_hpc.config import LADDER_WARM_START, TrainConfig
from autopipec_hpc.states import RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import ConfigError
from autopipec_hpc.files import atomic_write_text

# What makes two potentials' bases the same for a warm start.
BASIS_SETTINGS = ("cutoff", "b_basis_size", "max_degree")
METADATA_KEYS_DROPPED = ("reference_energy",)


@dataclass(frozen=True)
class Parent:
    generation: int
    folder: Path
    manifest: registry.PotentialManifest


def dataset_elements(db: DatabaseManager, status: str = StructureStatus.TRAINING_READY) -> list[str]:
    """The elements of the rows with ``status``, streamed."""
    numbers: set[int] = set()
    for row in db.iter_rows(status=status):
        numbers.update(int(z) for z in set(row.numbers))
    return sorted(chemical_symbols[z] for z in numbers)


def check_warm_start(database: str, config: TrainConfig) -> tuple[TrainConfig, Parent]:
    """The training config to use (the parent's reference energies) and the parent;
    ConfigError naming what differs. Reads only."""
    n = config.warm_start
    assert n is not None
    if config.ladder_step is not None:
        # The loop sets warm_start with model_copy, past TrainConfig's own check.
        raise ConfigError(f"warm_start from generation {n}: {LADDER_WARM_START}")
    db = DatabaseManager(database, must_exist=True)
    record = db.get_record(n)
    if record is None or record.status != RecordState.SUCCEEDED or record.potential_path is None:
        state = "no training record" if record is None else f"record {record.status}"
        raise ConfigError(f"warm_start: generation {n} has no published potential ({state})")
    folder = Path(record.potential_path)
    if not (folder / registry.POTENTIAL_YAML).exists():
        raise ConfigError(f"warm_start: generation {n}'s {folder / registry.POTENTIAL_YAML} is missing")
    manifest = registry.read_manifest(folder)
    for key in ("zbl_inner", "zbl_outer"):
        mine, theirs = getattr(config, key), getattr(manifest, key)
        if mine != theirs:
            raise ConfigError(f"warm_start from generation {n}: {key} {mine} differs from the parent's {theirs}")
    parent_config = record.data.get("config") or {}
    for key in BASIS_SETTINGS:
        if key in parent_config and parent_config[key] != getattr(config, key):
            raise ConfigError(
                f"warm_start from generation {n}: {key} {getattr(config, key)} differs from the parent's "
                f"{parent_config[key]} (the basis must be the same)"
            )
    elements = dataset_elements(db)
    if elements and elements != sorted(manifest.elements):
        raise ConfigError(
            f"warm_start from generation {n}: elements {','.join(elements)} of the dataset differ from the "
            f"parent's {','.join(sorted(manifest.elements))}"
        )
    refs = {k: float(v) for k, v in manifest.reference_energies.items()}
    if config.reference_energies is not None and {k: float(v) for k, v in config.reference_energies.items()} != refs:
        raise ConfigError(
            f"warm_start from generation {n}: reference_energies {dict(config.reference_energies)} differ from "
            f"the parent's {refs}; leave reference_energies unset to use the parent's"
        )
    return config.model_copy(update={"reference_energies": refs}), Parent(n, folder, manifest)


def stage_parent_potential(parent: Parent, destination: Path) -> Path:
    """Copy the parent's potential to ``destination`` without the metadata pacemaker
    would read reference energies from."""
    potential = yaml.safe_load((parent.folder / registry.POTENTIAL_YAML).read_text())
    metadata = potential.get("metadata") or {}
    for key in METADATA_KEYS_DROPPED:
        metadata.pop(key, None)
    metadata["warm_start_parent"] = f"autopipec-hpc generation {parent.generation}"
    potential["metadata"] = metadata
    atomic_write_text(destination, yaml.safe_dump(potential, sort_keys=False))
    return destination
