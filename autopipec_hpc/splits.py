"""Train/test splits, stratified by config_type."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping

import numpy as np


def stratified_split(
    config_types: Mapping[int, str], test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[str]]:
    """Train ids, test ids, and the config_types that had a single structure.

    Each config_type with n >= 2 structures puts round(f * n) of them, at least
    one and at most n - 1, in the test set. Deterministic for a given seed and
    set of ids, whatever order the ids came in.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for db_id, ctype in config_types.items():
        groups[ctype].append(db_id)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    singles: list[str] = []
    for ctype in sorted(groups):
        ids = sorted(groups[ctype])
        if len(ids) == 1:
            singles.append(ctype)
            train.extend(ids)
            continue
        n_test = 0 if test_fraction == 0 else min(max(1, round(test_fraction * len(ids))), len(ids) - 1)
        order = rng.permutation(len(ids))
        test.extend(ids[k] for k in order[:n_test])
        train.extend(ids[k] for k in order[n_test:])
    return sorted(train), sorted(test), singles


def split_draw(unique_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by a structure's unique id and the seed alone."""
    digest = hashlib.sha256(f"{seed}:{unique_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stable_split(
    keys: Mapping[int, tuple[str, str]], test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[str]]:
    """Train ids, test ids and single-structure config_types, from ``{db_id: (config_type, unique_id)}``.

    A structure is in the test set when its draw (``split_draw``: its unique id and
    the seed, nothing else) is below ``test_fraction``, so it keeps its side whatever
    rows are added later: generation N+1's holdout holds N's holdout rows plus new
    ones. Still stratified: the share of each config_type is ``test_fraction`` in
    expectation, and a config_type with n >= 2 structures keeps at least one on each
    side (its lowest draw in test, its highest in train, when the draws alone would
    not). Only those guard rows can change side as a small config_type grows.
    """
    names = sorted({ctype for ctype, _ in keys.values()})
    index = {name: k for k, name in enumerate(names)}
    ids = np.fromiter(keys, dtype=np.int64, count=len(keys))
    kinds = np.fromiter((index[ctype] for ctype, _ in keys.values()), dtype=np.int64, count=len(keys))
    draws = np.fromiter((split_draw(uid, seed) for _, uid in keys.values()), dtype=float, count=len(keys))
    return split_by_draws(ids, kinds, names, draws, test_fraction)


def split_by_draws(
    ids: np.ndarray, kinds: np.ndarray, config_types: list[str], draws: np.ndarray, test_fraction: float
) -> tuple[list[int], list[int], list[str]]:
    """``stable_split`` on columns: ``kinds[i]`` indexes ``config_types``, ``draws[i]`` is
    row i's ``split_draw``. Within a config_type the rows are taken in (draw, id) order."""
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    singles: list[str] = []
    for kind in sorted(range(len(config_types)), key=config_types.__getitem__):
        members = np.flatnonzero(kinds == kind)
        if len(members) == 0:
            continue
        order = members[np.lexsort((ids[members], draws[members]))]
        if len(order) == 1:
            singles.append(config_types[kind])
            train.append(ids[order])
            continue
        if test_fraction == 0:
            train.append(ids[order])
            continue
        n_test = min(max(1, int(np.count_nonzero(draws[order] < test_fraction))), len(order) - 1)
        test.append(ids[order[:n_test]])
        train.append(ids[order[n_test:]])

    def ordered(parts: list[np.ndarray]) -> list[int]:
        return np.sort(np.concatenate(parts)).tolist() if parts else []

    return ordered(train), ordered(test), singles
