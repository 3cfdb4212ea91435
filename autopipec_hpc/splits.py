"""Train/test splits, stratified by config_type, that a row keeps for good.

Why the rule is what it is:

- A structure's draw hashes its content (atomic numbers, cell, pbc, positions to
  1e-6 A) with the seed, not ASE's ``unique_id``, which ASE draws at random when it
  writes a row: the same file and seed must give the same split in any database.
- Each config type gets a test quota, round(test_fraction * n) clamped to [1, n - 1],
  filled in draw order; a per-row threshold on the draw made the count binomial
  (5 of 31 where 10 % is 3), breaking the "90/10 stratified" promise.
- A row that a published generation used keeps that side (``info["split"]``), so
  every generation is measured on a common holdout and never trains on it; new
  rows only fill what the quota still lacks, and a type already over its quota
  keeps its rows rather than move one.
- A row active learning chose for labelling (``info["selected_by_generation"]``)
  trains: it was chosen because the potential extrapolates there, which is what
  training needs, and a holdout of the hardest cases would no longer be comparable.
- Identical structures have equal draws; the lower database id goes first, so
  duplicates still split the same way every time.
- A fixed holdout the user names (``FixedHoldout``: config types, or the structures
  of an Extended XYZ file, matched by content) is test in every generation, whatever
  else settled a row, so every generation of a loop is compared on the same rows
  and none trains on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autopipec_hpc.errors import ConfigError

# A row's side: FREE rows are the ones the split may place.
FREE, TRAIN, TEST = 0, 1, 2

_DECIMALS = 6  # positions and cell rounded to 1e-6 A, so a file's float noise cannot move a row


def _rounded(values: Any) -> bytes:
    # + 0.0 turns -0.0 into 0.0, which would hash differently.
    return (np.round(np.asarray(values, dtype=np.float64), _DECIMALS) + 0.0).astype("<f8").tobytes()


class FixedHoldout(BaseModel):
    """TrainConfig's ``holdout``: structures that are test in every generation, never
    trained on, and what the common-holdout comparison uses. ``config_type``: one name
    or a list; ``file``: an Extended XYZ file whose structures (by content: species,
    cell, pbc, positions to 1e-6 A) are in the database, e.g. imported from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_type: tuple[str, ...] = Field((), description="config types whose every structure is test")
    file: Path | None = Field(None, description="Extended XYZ: the database's structures of the same content are test")

    @field_validator("config_type", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("config_type")
    @classmethod
    def _named(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in value):
            raise ValueError("a config_type name cannot be empty")
        return value

    @model_validator(mode="after")
    def _something(self) -> "FixedHoldout":
        if not self.config_type and self.file is None:
            raise ValueError("name a config_type or a file")
        return self

    def describe(self) -> str:
        parts = [f"config_type {', '.join(self.config_type)}"] if self.config_type else []
        return "; ".join(parts + ([f"file {self.file}"] if self.file is not None else []))


def content_key(atoms: Atoms) -> bytes:
    """A digest of the structure's content alone (what ``fingerprint_draw`` hashes, no seed)."""
    digest = hashlib.sha256(f"{len(atoms)}:".encode())
    digest.update(np.asarray(atoms.numbers, dtype="<i8").tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.uint8).tobytes())
    digest.update(_rounded(atoms.cell.array))
    digest.update(_rounded(atoms.positions))
    return digest.digest()


def holdout_file_keys(path: Path) -> dict[bytes, int]:
    """The content keys of the frames of ``path`` (an Extended XYZ file), each with the first
    frame that has it; ConfigError naming the file when it is missing, unreadable or empty."""
    import ase.io

    try:
        frames = ase.io.iread(str(path), index=":", format="extxyz")
        keys: dict[bytes, int] = {}
        for k, atoms in enumerate(frames):
            keys.setdefault(content_key(atoms), k)
    except FileNotFoundError:
        raise ConfigError(f"holdout file {path}: no such file") from None
    except Exception as exc:  # ASE's readers raise anything on a damaged file
        text = " ".join(str(exc).split())[:160]
        raise ConfigError(f"holdout file {path}: not a readable Extended XYZ file ({type(exc).__name__}: {text})") from None
    if not keys:
        raise ConfigError(f"holdout file {path}: no structures in it")
    return keys


def check_holdout_found(holdout: FixedHoldout, keys: Mapping[bytes, int], config_types: Iterable[str],
                        matched: Iterable[bytes]) -> None:
    """ConfigError naming a holdout config type with no labelled structure, or the file's
    frames that match none: a fixed holdout smaller than named would compare less than it says."""
    present = set(config_types)
    unknown = [name for name in holdout.config_type if name not in present]
    if unknown:
        raise ConfigError(f"holdout: config_type {', '.join(map(repr, unknown))} has no labelled structure "
                          f"(config types: {', '.join(sorted(present)) or 'none'})")
    missing = sorted(k for key, k in keys.items() if key not in set(matched))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(f"holdout file {holdout.file}: {len(missing)} of its {len(keys)} structures (frames {shown}) "
                          f"match no labelled structure in the database; import them first: "
                          f"autopipec-hpc import {holdout.file}")


def fingerprint_draw(atoms: Atoms, seed: int) -> float:
    """A number in [0, 1) fixed by the structure's content and the seed alone."""
    digest = hashlib.sha256(f"{int(seed)}:{len(atoms)}:".encode())
    digest.update(np.asarray(atoms.numbers, dtype="<i8").tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.uint8).tobytes())
    digest.update(_rounded(atoms.cell.array))
    digest.update(_rounded(atoms.positions))
    # 53 bits: every one of them fits a float64, so the value stays below 1.
    return (int.from_bytes(digest.digest()[:8], "big") >> 11) / 2.0**53


def persisted_side(info: Mapping[str, Any]) -> int:
    """TRAIN or TEST where a row's side is settled already, FREE where the split chooses."""
    split = info.get("split")
    if split == "test":
        return TEST
    if split == "train":
        return TRAIN
    if info.get("selected_by_generation") is not None:
        return TRAIN
    return FREE


def holdout_quota(n: int, test_fraction: float) -> int:
    """How many of a config type's ``n`` structures belong in the test set."""
    if test_fraction == 0 or n < 2:
        return 0
    return min(max(1, round(test_fraction * n)), n - 1)



def split_by_draws(
    ids: np.ndarray, kinds: np.ndarray, config_types: list[str], draws: np.ndarray,
    test_fraction: float, kept: np.ndarray | None = None, fixed: np.ndarray | None = None,
) -> tuple[list[int], list[int], list[str]]:
    """Train ids, test ids (both sorted) and the config_types with a single structure.

    Row i has id ``ids[i]``, config type ``config_types[kinds[i]]``, draw ``draws[i]``
    (``fingerprint_draw``) and side ``kept[i]`` (``persisted_side``; all FREE when
    ``kept`` is None). Rows of the fixed holdout (``fixed[i]`` true) are test. Settled
    rows keep their side; per config type, the FREE rows with the lowest (draw, id)
    fill ``holdout_quota`` (of the rows outside the fixed holdout) minus the settled
    test rows, the other FREE rows train.
    """
    ids = np.asarray(ids, dtype=np.int64)
    kinds = np.asarray(kinds)
    draws = np.asarray(draws, dtype=np.float64)
    kept = np.zeros(len(ids), dtype=np.int8) if kept is None else np.asarray(kept)
    fixed = np.zeros(len(ids), dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = [ids[fixed]]
    singles: list[str] = []
    for kind in sorted(range(len(config_types)), key=config_types.__getitem__):
        members = np.flatnonzero((kinds == kind) & ~fixed)
        if len(members) == 0:
            continue
        if len(members) == 1:
            singles.append(config_types[kind])
        sides = kept[members]
        free = members[sides == FREE]
        free = free[np.lexsort((ids[free], draws[free]))]
        n_test = holdout_quota(len(members), test_fraction) - int(np.count_nonzero(sides == TEST))
        n_test = min(max(n_test, 0), len(free))
        test += [ids[members[sides == TEST]], ids[free[:n_test]]]
        train += [ids[members[sides == TRAIN]], ids[free[n_test:]]]

    def ordered(parts: list[np.ndarray]) -> list[int]:
        return np.sort(np.concatenate(parts)).tolist() if parts else []

    return ordered(train), ordered(test), singles
