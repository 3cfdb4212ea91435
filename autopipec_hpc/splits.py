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
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from ase import Atoms

# A row's side: FREE rows are the ones the split may place.
FREE, TRAIN, TEST = 0, 1, 2

_DECIMALS = 6  # positions and cell rounded to 1e-6 A, so a file's float noise cannot move a row


def _rounded(values: Any) -> bytes:
    # + 0.0 turns -0.0 into 0.0, which would hash differently.
    return (np.round(np.asarray(values, dtype=np.float64), _DECIMALS) + 0.0).astype("<f8").tobytes()


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
    test_fraction: float, kept: np.ndarray | None = None,
) -> tuple[list[int], list[int], list[str]]:
    """Train ids, test ids (both sorted) and the config_types with a single structure.

    Row i has id ``ids[i]``, config type ``config_types[kinds[i]]``, draw ``draws[i]``
    (``fingerprint_draw``) and side ``kept[i]`` (``persisted_side``; all FREE when
    ``kept`` is None). Settled rows keep their side; per config type, the FREE rows
    with the lowest (draw, id) fill ``holdout_quota`` minus the settled test rows, the
    other FREE rows train.
    """
    ids = np.asarray(ids, dtype=np.int64)
    kinds = np.asarray(kinds)
    draws = np.asarray(draws, dtype=np.float64)
    kept = np.zeros(len(ids), dtype=np.int8) if kept is None else np.asarray(kept)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    singles: list[str] = []
    for kind in sorted(range(len(config_types)), key=config_types.__getitem__):
        members = np.flatnonzero(kinds == kind)
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
