"""Labelled structures -> ZBL-delta datasets pacemaker trains and tests on.

Two streaming passes over the structures, so memory follows the largest
structure and the shard size, never the number of structures:

1. check labels, compute ZBL energy and forces (forces go to a temporary
   file), note id / config_type / composition / content draw; then split
   (stratified by config_type, sides kept across generations: splits.py) and
   settle the reference energies;
2. read each structure again, write the delta targets to pacemaker pickles
   (sharded by atoms and rows) and Extended XYZ.

Target energy = E_DFT - E_ZBL - sum of per-element reference energies;
target forces = F_DFT - F_ZBL.
"""

from __future__ import annotations

from autopipec_hpc.dataset_files import ShardedPickleWriter, extxyz_frame, maybe_xyz

import json
import logging
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from ase import Atoms
from ase.io.extxyz import write_xyz

from autopipec_hpc.errors import ConfigError, DatasetError, InsufficientDataError, StructureError, one_line
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.physics import ZBLCalculator, fit_reference_energies_from_counts, per_atom_reference
from autopipec_hpc.splits import (TEST, TRAIN, FixedHoldout, check_holdout_found, content_key, fingerprint_draw,
                                  holdout_file_keys, persisted_side, split_by_draws)

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"


@dataclass(frozen=True)
class DatasetSettings:
    test_fraction: float = 0.1
    seed: int = 42
    zbl_inner: float = 1.0
    zbl_outer: float = 2.0
    reference_energies: Mapping[str, float] | None = None
    shard_atoms: int = 50_000
    shard_rows: int = 1_000
    write_extxyz: bool = True
    holdout: FixedHoldout | None = None  # test in every generation (splits.py)

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.shard_atoms < 1 or self.shard_rows < 1:
            raise ConfigError(f"shard_atoms and shard_rows must be >= 1, got {self.shard_atoms}, {self.shard_rows}")
        ZBLCalculator(self.zbl_inner, self.zbl_outer)  # validates the cutoffs


@dataclass
class SkippedStructure:
    db_id: Any
    config_type: str
    reason: str


@dataclass
class DatasetManifest:
    """What ``prepare`` wrote; saved as ``dataset.json`` beside the files."""

    directory: str
    train_files: list[str]
    test_files: list[str]
    train_extxyz: str | None
    test_extxyz: str | None
    train_ids: list[int]
    test_ids: list[int]
    train_counts: dict[str, int]
    test_counts: dict[str, int]
    single_structure_types: list[str]
    skipped: list[SkippedStructure]
    reference_energies: dict[str, float]
    reference_energies_source: str
    elements: list[str]
    zbl_inner: float
    zbl_outer: float
    zbl_energy_range: tuple[float, float]
    zbl_energy_per_atom_range: tuple[float, float]
    target_energy_per_atom_range: tuple[float, float]
    min_distance: float
    has_force_weights: bool
    test_fraction: float
    seed: int
    holdout_ids: list[int] = field(default_factory=list)  # the fixed holdout's rows (all in test_ids)
    holdout: str = ""  # what names the fixed holdout (FixedHoldout.describe); "" where none was named

    @property
    def train_paths(self) -> list[Path]:
        return [Path(self.directory) / f for f in self.train_files]

    @property
    def test_paths(self) -> list[Path]:
        return [Path(self.directory) / f for f in self.test_files]

    def save(self) -> Path:
        path = Path(self.directory) / MANIFEST
        atomic_write_text(path, json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetManifest":
        path = Path(directory) / MANIFEST
        try:
            raw = json.loads(path.read_text())
            raw["skipped"] = [SkippedStructure(**s) for s in raw["skipped"]]
            for key in ("zbl_energy_range", "zbl_energy_per_atom_range", "target_energy_per_atom_range"):
                raw[key] = tuple(raw[key])
            raw["directory"] = str(directory)
            return cls(**raw)
        except FileNotFoundError:
            raise DatasetError(f"{path}: no such file (no dataset was prepared there)") from None
        except (ValueError, TypeError, KeyError) as exc:  # truncated, garbage, another shape
            raise DatasetError(f"{path}: not a dataset manifest ({one_line(exc)[:160]})") from None


@dataclass(slots=True)
class _Seen:
    """What pass 1 keeps per usable structure: small, independent of its size."""

    db_id: int
    config_type: str
    natoms: int
    composition: tuple[tuple[str, int], ...]
    energy_dft: float
    energy_zbl: float
    zbl_forces_at: int  # byte offset of this structure's ZBL forces in the spill file


class _SeenTable:
    """What pass 1 keeps, as typed columns: about 60 bytes per structure where a list
    of objects took about 500, so `prepare`'s memory stays flat as rows grow (100,000
    rows are 6 MB here). Config types and compositions are stored once each."""

    def __init__(self) -> None:
        self.db_ids, self.natoms, self.offsets = array("q"), array("l"), array("q")
        self.kinds, self.compositions = array("l"), array("l")
        self.energy_dft, self.energy_zbl, self.draws = array("d"), array("d"), array("d")
        self.kept = array("b")  # splits.persisted_side of each row
        self.fixed = array("b")  # 1 for a row of the fixed holdout
        self.holdout_matched: set[bytes] = set()  # the holdout file's content keys seen
        self.config_types: list[str] = []
        self.composition_table: list[tuple[tuple[str, int], ...]] = []
        self._kind_of: dict[str, int] = {}
        self._composition_of: dict[tuple[tuple[str, int], ...], int] = {}
        self._sorted_ids: np.ndarray | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.db_ids)

    def add(self, db_id: int, config_type: str, natoms: int, composition: tuple[tuple[str, int], ...],
            energy_dft: float, energy_zbl: float, offset: int, draw: float, kept: int, fixed: bool = False) -> None:
        self.db_ids.append(db_id)
        self.kinds.append(self._kind_of.setdefault(config_type, len(self._kind_of)))
        if len(self._kind_of) > len(self.config_types):
            self.config_types.append(config_type)
        self.compositions.append(self._composition_of.setdefault(composition, len(self._composition_of)))
        if len(self._composition_of) > len(self.composition_table):
            self.composition_table.append(composition)
        self.natoms.append(natoms)
        self.energy_dft.append(energy_dft)
        self.energy_zbl.append(energy_zbl)
        self.offsets.append(offset)
        self.draws.append(draw)
        self.kept.append(kept)
        self.fixed.append(int(fixed))

    def column(self, name: str) -> np.ndarray:
        """A column as a numpy view (no copy)."""
        values = getattr(self, name)
        return np.frombuffer(values, dtype=values.typecode) if len(values) else np.zeros(0, values.typecode)

    def ids_are_unique(self) -> bool:
        ids = np.sort(self.column("db_ids"))
        return not bool(np.any(ids[1:] == ids[:-1]))

    def position(self, db_id: int) -> int | None:
        """Where ``db_id`` sits in the columns (None if pass 1 did not keep it)."""
        if self._order is None:
            ids = self.column("db_ids")
            self._order = np.argsort(ids, kind="stable")
            self._sorted_ids = ids[self._order]
        k = int(np.searchsorted(self._sorted_ids, db_id))
        if k < len(self._sorted_ids) and int(self._sorted_ids[k]) == db_id:
            return int(self._order[k])
        return None

    def row(self, position: int) -> _Seen:
        return _Seen(self.db_ids[position], self.config_types[self.kinds[position]], self.natoms[position],
                     self.composition_table[self.compositions[position]], self.energy_dft[position],
                     self.energy_zbl[position], self.offsets[position])

    def positions_of(self, ids: list[int]) -> np.ndarray:
        return np.fromiter((self.position(i) for i in ids), dtype=np.int64, count=len(ids))


# -- checks and split ---------------------------------------------------------
def dft_labels(atoms: Atoms) -> tuple[float, np.ndarray]:
    """The DFT energy and forces of a structure, or StructureError saying what is wrong."""
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get("energy")
    forces = results.get("forces")
    if energy is None:
        raise StructureError("missing energy")
    if not np.isfinite(energy):
        raise StructureError(f"energy is {energy}")
    if forces is None:
        raise StructureError("missing forces")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise StructureError(f"forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    if not np.isfinite(forces).all():
        bad = int(np.argwhere(~np.isfinite(forces))[0][0])
        raise StructureError(f"forces contain NaN or Inf (atom {bad})")
    mask = atoms.arrays.get("force_mask")
    if mask is not None and np.shape(mask) != (len(atoms),):
        raise StructureError(f"force_mask has shape {np.shape(mask)}, expected ({len(atoms)},)")
    return float(energy), forces


# -- the builder ----------------------------------------------------------------
def composition_matrix(
    table: list[tuple[tuple[str, int], ...]], rows: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """Atom counts per element (columns: the elements present) of the rows whose
    composition indices (into ``table``) are ``rows``."""
    elements = sorted({el for comp in (table[k] for k in np.unique(rows)) for el, _ in comp})
    per_composition = np.array([[dict(comp).get(el, 0) for el in elements] for comp in table], dtype=float)
    return per_composition[rows].reshape(len(rows), len(elements)), elements


class DatasetBuilder:
    """Builds the train and test datasets of one training run."""

    def __init__(self, settings: DatasetSettings | None = None) -> None:
        self.settings = settings or DatasetSettings()
        self.zbl = ZBLCalculator(self.settings.zbl_inner, self.settings.zbl_outer)
        holdout = self.settings.holdout
        self.holdout_keys = holdout_file_keys(holdout.file) if holdout and holdout.file else {}

    def _in_holdout(self, atoms: Atoms, ctype: str, seen: _SeenTable) -> bool:
        holdout = self.settings.holdout
        if holdout is None:
            return False
        key = content_key(atoms) if self.holdout_keys else b""
        if key in self.holdout_keys:
            seen.holdout_matched.add(key)
            return True
        return ctype in holdout.config_type

    def _scan(
        self, structures: Iterable[Atoms], spill: IO[bytes]
    ) -> tuple[_SeenTable, list[SkippedStructure], bool, float]:
        """Pass 1. ZBL forces go to ``spill`` (a temporary file), so pass 2 reuses
        them without holding every structure's forces in memory."""
        seen = _SeenTable()
        skipped: list[SkippedStructure] = []
        has_mask = False
        min_distance = np.inf
        for index, atoms in enumerate(structures):
            db_id = atoms.info.get("db_id", index)
            atoms.info.setdefault("db_id", db_id)
            ctype = str(atoms.info.get("config_type", "default"))
            try:
                energy, _ = dft_labels(atoms)
                pairs = self.zbl.pairs(atoms)
                e_zbl, _, f_zbl, _ = self.zbl.evaluate(atoms, pairs=pairs)
            except StructureError as exc:
                reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("structure") else str(exc)
                log.warning("skipping structure id=%s (%s): %s", db_id, ctype, reason)
                skipped.append(SkippedStructure(db_id=db_id, config_type=ctype, reason=reason))
                continue
            has_mask = has_mask or "force_mask" in atoms.arrays
            if len(pairs[2]):
                min_distance = min(min_distance, float(pairs[2].min()))
            offset = spill.tell()
            spill.write(np.ascontiguousarray(f_zbl, dtype=np.float64).tobytes())
            seen.add(int(db_id), ctype, len(atoms), tuple(sorted(Counter(atoms.get_chemical_symbols()).items())),
                     energy, e_zbl, offset, fingerprint_draw(atoms, self.settings.seed),
                     persisted_side(atoms.info), self._in_holdout(atoms, ctype, seen))
        if self.settings.holdout is not None:
            check_holdout_found(self.settings.holdout, self.holdout_keys, seen.config_types, seen.holdout_matched)
        return seen, skipped, has_mask, float(min_distance)

    def prepare_dataset(self, structures: Iterable[Atoms], output_path: str | Path) -> DatasetManifest:
        """Write train/test pickles, Extended XYZ and ``dataset.json`` into ``output_path``.

        ``structures`` is iterated twice (a list, or a re-iterable database
        view). Each Atoms carries its DFT labels in a calculator, and
        ``info['db_id']`` / ``info['config_type']``; ``arrays['force_mask']``
        is optional. Unusable structures are skipped, logged and listed.
        ``info['split']`` (the side a published generation gave the row) and
        ``info['selected_by_generation']`` settle a row's side (``splits``).
        """
        with tempfile.TemporaryFile() as spill:
            return self._prepare(structures, Path(output_path), spill)

    def _prepare(self, structures: Iterable[Atoms], out: Path, spill: IO[bytes]) -> DatasetManifest:
        settings = self.settings
        seen, skipped, has_mask, min_distance = self._scan(structures, spill)
        if not len(seen):
            detail = f" ({len(skipped)} skipped: {skipped[0].reason} ...)" if skipped else ""
            raise InsufficientDataError(f"no usable structures to build a dataset from{detail}")
        if not seen.ids_are_unique():
            raise InsufficientDataError("structure ids are not unique; cannot split reproducibly")
        ids, kinds = seen.column("db_ids"), seen.column("kinds")
        fixed = seen.column("fixed").astype(bool)
        train_ids, test_ids, singles = split_by_draws(
            ids, kinds, seen.config_types, seen.column("draws"), settings.test_fraction, seen.column("kept"), fixed
        )
        if not train_ids:
            raise InsufficientDataError("no structures left for training after the split")
        side = np.zeros(len(seen), dtype=np.int8)  # by position: 1 train, 2 test, 0 neither
        side[seen.positions_of(train_ids)] = TRAIN
        side[seen.positions_of(test_ids)] = TEST
        energy_dft, energy_zbl = seen.column("energy_dft"), seen.column("energy_zbl")
        if settings.reference_energies is not None:
            references = {k: float(v) for k, v in settings.reference_energies.items()}
            source = "given"
        else:
            train = side == TRAIN
            references = fit_reference_energies_from_counts(
                *composition_matrix(seen.composition_table, seen.column("compositions")[train]),
                energy_dft[train] - energy_zbl[train],
            )
            source = "least squares on the training set"
        elements = sorted({el for comp in seen.composition_table for el, _ in comp})
        missing = sorted(set(elements) - set(references))
        if missing:
            raise ConfigError(f"reference_energies has no value for element(s) {', '.join(missing)}")

        out.mkdir(parents=True, exist_ok=True)
        writers = {
            name: ShardedPickleWriter(out, name, settings.shard_atoms, settings.shard_rows) for name in ("train", "test")
        }
        xyz_paths = {name: out / f"{name}.extxyz" for name in ("train", "test")}
        target_lo, target_hi = np.inf, -np.inf  # energy per atom
        with maybe_xyz(xyz_paths["train"], settings.write_extxyz) as xyz_train, maybe_xyz(
            xyz_paths["test"], settings.write_extxyz and bool(test_ids)
        ) as xyz_test:
            xyz = {TRAIN: xyz_train, TEST: xyz_test}
            for index, atoms in enumerate(structures):
                db_id = int(atoms.info.get("db_id", index))
                position = seen.position(db_id)
                if position is None or side[position] == 0:
                    continue  # skipped in pass 1
                split = int(side[position])
                atoms.info.setdefault("db_id", db_id)
                row, frame = self._delta_row(atoms, seen.row(position), references, has_mask, spill)
                per_atom = row["energy_corrected"] / len(atoms)
                target_lo, target_hi = min(target_lo, per_atom), max(target_hi, per_atom)
                writers["train" if split == TRAIN else "test"].add(row)
                if xyz[split] is not None:
                    # ASE's own writer, called directly: ase.io.write's dispatch costs
                    # as much again per small frame.
                    write_xyz(xyz[split], [frame])
        train_files = writers["train"].close()
        test_files = writers["test"].close()
        counts = {
            name: {seen.config_types[k]: int(n) for k, n in sorted(
                enumerate(np.bincount(kinds[side == code], minlength=len(seen.config_types))),
                key=lambda kn: seen.config_types[kn[0]]) if n}
            for name, code in (("train", TRAIN), ("test", TEST))
        }
        e_zbl = energy_zbl
        e_zbl_pa = energy_zbl / seen.column("natoms")
        manifest = DatasetManifest(
            directory=str(out),
            train_files=train_files,
            test_files=test_files,
            train_extxyz=xyz_paths["train"].name if settings.write_extxyz else None,
            test_extxyz=xyz_paths["test"].name if settings.write_extxyz and test_ids else None,
            train_ids=train_ids,
            test_ids=test_ids,
            train_counts=counts["train"],
            test_counts=counts["test"],
            single_structure_types=singles,
            skipped=skipped,
            reference_energies=references,
            reference_energies_source=source,
            elements=elements,
            zbl_inner=settings.zbl_inner,
            zbl_outer=settings.zbl_outer,
            zbl_energy_range=(float(e_zbl.min()), float(e_zbl.max())),
            zbl_energy_per_atom_range=(float(e_zbl_pa.min()), float(e_zbl_pa.max())),
            target_energy_per_atom_range=(float(target_lo), float(target_hi)),
            min_distance=min_distance,
            has_force_weights=has_mask,
            test_fraction=settings.test_fraction,
            seed=settings.seed,
            holdout_ids=sorted(int(i) for i in ids[fixed]),
            holdout=settings.holdout.describe() if settings.holdout else "",
        )
        manifest.save()
        return manifest

    def _delta_row(self, atoms: Atoms, seen: _Seen, references: Mapping[str, float],
                   has_mask: bool, spill: IO[bytes]) -> tuple[dict[str, Any], Atoms]:
        energy_dft, forces_dft = dft_labels(atoms)
        if energy_dft != seen.energy_dft or len(atoms) != seen.natoms:
            raise StructureError(f"structure id={seen.db_id} changed between the two passes")
        e_zbl = seen.energy_zbl
        spill.seek(seen.zbl_forces_at)
        f_zbl = np.frombuffer(spill.read(seen.natoms * 3 * 8), dtype=np.float64).reshape(seen.natoms, 3)
        e_ref = float(per_atom_reference(atoms, references).sum())
        target_e = energy_dft - e_zbl - e_ref
        target_f = forces_dft - f_zbl
        clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        row: dict[str, Any] = {
            "ase_atoms": clean,
            # pacemaker recomputes energy_corrected from `energy` when it
            # distrusts the range; both hold the target so either way it trains on it.
            "energy": target_e,
            "energy_corrected": target_e,
            "forces": target_f,
            "config_type": seen.config_type,
            "db_id": seen.db_id,
            "energy_dft": energy_dft,
            "forces_dft": forces_dft,
            "energy_zbl": e_zbl,
            "forces_zbl": f_zbl,
            "energy_reference": e_ref,
        }
        weights = None
        if has_mask:
            mask = atoms.arrays.get("force_mask")
            weights = np.ones(len(atoms)) if mask is None else (np.asarray(mask) != 0).astype(float)
            row["w_energy"] = 1.0
            row["w_forces"] = weights
        frame = extxyz_frame(atoms, target_e, target_f, seen.config_type, seen.db_id, weights)
        return row, frame


