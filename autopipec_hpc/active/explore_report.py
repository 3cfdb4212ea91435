"""An exploration's report: its figures from the trajectories' results, ``summary.json``
and ``exploration.png`` (share of candidates against temperature, gamma histogram)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from autopipec_hpc.active.explore_folder import ExplorationFolder
from autopipec_hpc.files import atomic_output
from autopipec_hpc.states import StopReason


class ExploreCounts(BaseModel):
    """Frames and trajectories of one group (an ensemble at a temperature, or all)."""

    model_config = ConfigDict(extra="forbid")

    trajectories: int = 0
    steps: int = 0
    seen: int = 0
    accurate: int = 0
    candidates: int = 0
    beyond: int = 0
    kept: int = 0
    stops: dict[str, int] = {}

    @property
    def accurate_share(self) -> float:
        return self.accurate / self.seen if self.seen else 0.0

    def add(self, r: dict[str, Any]) -> None:
        self.trajectories += 1
        for key in ("steps", "seen", "accurate", "candidates", "beyond", "kept"):
            setattr(self, key, getattr(self, key) + int(r[key]))
        self.stops = dict(Counter(self.stops) + Counter({r["stop"]: 1}))


class ExploreSummary(BaseModel):
    """The report of one exploration, as summary.json holds it and the marker row's data."""

    model_config = ConfigDict(extra="forbid")

    generation: int
    folder: str
    gamma_lo: float
    gamma_hi: float
    total: ExploreCounts
    groups: dict[str, ExploreCounts]  # "nvt 900 K", "npt 600 K 10 GPa"
    imported: int  # candidate rows written
    figure: str | None = None

    @property
    def accurate_share(self) -> float:
        return self.total.accurate_share


def group_name(r: dict[str, Any]) -> str:
    name = f"{r['ensemble']} {r['temperature_K']:g} K"
    return name if r.get("pressure_GPa") is None else f"{name} {r['pressure_GPa']:g} GPa"


def summarise(generation: int, folder: ExplorationFolder, results: list[dict[str, Any]], gamma_lo: float,
              gamma_hi: float, imported: int) -> ExploreSummary:
    total, groups = ExploreCounts(), {}
    for r in sorted(results, key=lambda r: (r["ensemble"], r["temperature_K"], r.get("pressure_GPa") or 0.0)):
        total.add(r)
        groups.setdefault(group_name(r), ExploreCounts()).add(r)
    return ExploreSummary(generation=generation, folder=str(folder.path), gamma_lo=gamma_lo, gamma_hi=gamma_hi,
                          total=total, groups=groups, imported=imported)


def marker_values(summary: ExploreSummary) -> dict[str, Any]:
    """The marker row's key-value pairs: the figures the loop and ``status`` read."""
    t = summary.total
    values: dict[str, Any] = {"folder": summary.folder, "n_trajectories": t.trajectories, "n_seen": t.seen,
                              "n_accurate": t.accurate, "n_candidates": t.candidates, "n_beyond": t.beyond,
                              "n_imported": summary.imported, "accurate_share": round(summary.accurate_share, 6)}
    values.update({f"n_stop_{reason.value}": t.stops.get(reason.value, 0) for reason in StopReason})
    return values


def write_report(folder: ExplorationFolder, summary: ExploreSummary, results: list[dict[str, Any]]) -> ExploreSummary:
    """summary.json and exploration.png in ``folder``; the summary names its figure."""
    summary = summary.model_copy(update={"figure": _figure(folder, summary, results)})
    folder.write_json(folder.summary_file, summary.model_dump(mode="json"))
    return summary


def _figure(folder: ExplorationFolder, summary: ExploreSummary, results: list[dict[str, Any]]) -> str | None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    gammas = np.array([g for r in results for g in r["gammas"]], dtype=float)
    if not len(gammas):
        return None
    fig = Figure(figsize=(9, 3.6))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    by_ensemble: dict[str, dict[float, list[int]]] = {}
    for r in results:
        point = by_ensemble.setdefault(r["ensemble"], {}).setdefault(float(r["temperature_K"]), [0, 0])
        point[0] += int(r["candidates"])
        point[1] += int(r["seen"])
    for ensemble, points in sorted(by_ensemble.items()):
        temps = sorted(points)
        left.plot(temps, [points[t][0] / max(points[t][1], 1) for t in temps], "o-", label=ensemble)
    left.set_xlabel("temperature (K)")
    left.set_ylabel("share of frames seen that are candidates")
    left.legend(fontsize=8)
    edges = np.linspace(np.log10(max(gammas.min(), 1e-3)), np.log10(max(gammas.max(), summary.gamma_hi) * 1.05), 31)
    right.hist(np.log10(np.maximum(gammas, 1e-3)), bins=edges, color="tab:blue")
    for x, style in ((summary.gamma_lo, "--"), (summary.gamma_hi, "-.")):
        right.axvline(np.log10(x), color="r", ls=style, lw=1.0)
    right.set_xlabel("log10 frame max gamma (lines: gamma_lo, gamma_hi)")
    right.set_ylabel("frames")
    fig.suptitle(f"generation {summary.generation}: {summary.total.seen} frames seen, "
                 f"{summary.accurate_share:.1%} accurate, {summary.imported} candidates kept", fontsize=10)
    fig.tight_layout()
    with atomic_output(folder.figure_file, "wb") as handle:  # a full disk leaves no half figure
        fig.savefig(handle, format="png", dpi=90)
    return folder.figure_file.name
