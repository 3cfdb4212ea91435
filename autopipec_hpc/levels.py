"""One level of theory per training set: the labelled rows' levels, counted and chosen.

A row labelled by a labeller (``active/labeller_config.py``) carries its ``labeller`` name
and ``labeller_hash`` (of the calculator and its settings): its level is ``NAME#HASH``.
A row imported with its labels records no level (import cannot know it): such rows are
trained on at whatever level the labelled rows have, and the README asks users to import
data of the one level they label at. Two recorded levels among the rows a training set
would use are refused by name, unless the train config's ``level_of_theory`` names one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from autopipec_hpc.errors import ConfigError, LevelOfTheoryError


def level_of(row: Any) -> str | None:
    """``NAME#HASH`` of the labeller that labelled ``row``; None where none was recorded."""
    name = row.get("labeller")
    return None if name is None else f"{name}#{row.get('labeller_hash', '')}"


def training_levels(db: Any, status: str) -> Counter:
    """How many rows with ``status`` each recorded level has (None: no level recorded)."""
    return Counter(level_of(row) for row in db.iter_rows(status=status))


def chosen_level(db: Any, status: str, wanted: str | None) -> str | None:
    """The level the training set is restricted to (None: no restriction needed). Refuses
    mixed levels unless ``wanted`` (a labeller name, or NAME#HASH) picks one."""
    counts = training_levels(db, status)
    recorded = {level: n for level, n in counts.items() if level is not None}
    named = ", ".join(f"{level} ({n} rows)" for level, n in sorted(recorded.items()))
    if wanted is None:
        if len(recorded) > 1:
            raise LevelOfTheoryError(
                f"the {status} rows of {db.target} mix levels of theory: {named}; set level_of_theory in the "
                "train config to the one to train on (a labeller name, or NAME#HASH)")
        return None
    match = [level for level in recorded if wanted in (level, level.split("#")[0])]
    if not match:
        raise ConfigError(f"level_of_theory {wanted!r}: no {status} rows labelled at it"
                          f" (levels found: {named or 'none recorded'})")
    if len(match) > 1:
        raise LevelOfTheoryError(f"level_of_theory {wanted!r} names {len(match)} settings: "
                                 f"{', '.join(sorted(match))}; give NAME#HASH")
    return match[0]
