"""The validation's results: typed (``ValidationReport``), saved as ``validation.json``,
drawn as ``validation.png``, and the headline figures a training record keeps."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from autopipec_hpc.files import atomic_output, atomic_write_text

REPORT = "validation.json"
PLOT = "validation.png"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EOSResult(_Model):
    volumes: list[float]
    energies: list[float]
    v0: float
    e0: float
    b0_gpa: float
    a0: float | None = None  # conventional cubic edge (fcc, bcc)
    reference: str | None = None  # "DFT <config_type>" or "generation N"
    ref_v0: float | None = None
    ref_b0_gpa: float | None = None
    ref_a0: float | None = None
    dft_volumes: list[float] = []
    dft_energies: list[float] = []  # shifted to the fit's E0 at the DFT minimum, for the plot
    dft_energies_model: list[float] = []  # the potential on the same DFT structures, shifted alike


class PhaseResult(_Model):
    """Another phase's DFT E(V) set, the potential on the same cells: its V0, B0 and its
    energy above the ground state, against DFT's (reported; the gate does not judge it)."""

    phase: str
    reference: str  # its config_type
    volumes: list[float]
    dft_energies: list[float]
    energies: list[float]  # the potential's
    v0: float
    b0_gpa: float
    ref_v0: float
    ref_b0_gpa: float
    above_ground_mev: float | None = None  # E0(phase) - E0(ground state), meV/atom
    ref_above_ground_mev: float | None = None


class ElementResult(_Model):
    element: str
    phase: str
    eos: EOSResult | None = None
    c11_gpa: float | None = None
    c12_gpa: float | None = None
    c44_gpa: float | None = None
    born_stable: bool | None = None
    vacancy_ev: float | None = None
    md_temperature_k: float | None = None
    md_failure: str | None = None  # "" stable; None: not run
    md_min_distance: float | None = None
    md_fused_threshold: float | None = None
    md_quench_min_distance: float | None = None
    md_nve_drift_mev_per_atom_ps: float | None = None
    md_time_ps: list[float] = []
    md_temperatures: list[float] = []
    md_min_distances: list[float] = []
    errors: dict[str, str] = {}  # property -> why it could not be computed
    phases: list[PhaseResult] = []


class DimerResult(_Model):
    pair: str
    distances: list[float]
    energies: list[float]
    zbl_energies: list[float]
    check_distance: float
    energy_at_check: float
    r_min: float  # the first minimum from short range
    min_floor: float  # closer than this, the first minimum is a spurious well
    repulsive: bool  # r_min >= min_floor


class ValidationReport(_Model):
    generation: int
    elements: list[ElementResult]
    dimers: list[DimerResult]
    failures: list[str] = []  # the gate's verdict: empty passes
    wall_time_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def one_line(self) -> str:
        return "validation failed: " + "; ".join(self.failures) if self.failures else "validation passed"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REPORT
        atomic_write_text(path, self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> "ValidationReport | None":
        path = Path(folder) / REPORT
        return cls.model_validate_json(path.read_text()) if path.exists() else None

    def headline(self) -> dict[str, float | str]:
        """The figures a training record keeps (``RecordValues``'s ``validation_*``): the first
        element's, named with how many there are (validation.json has every element's), and
        the verdict."""
        out: dict[str, float | str] = {"validation": "passed" if self.passed else "; ".join(self.failures)[:500],
                                       "validation_wall_time_s": self.wall_time_s}
        if self.elements:
            e = self.elements[0]
            eos = e.eos
            out["validation_element"] = e.element if len(self.elements) == 1 else \
                f"{e.element} (1 of {len(self.elements)})"
            figures = {
                "validation_a0": eos.a0 if eos else None, "validation_b0_gpa": eos.b0_gpa if eos else None,
                "validation_c11_gpa": e.c11_gpa, "validation_c12_gpa": e.c12_gpa, "validation_c44_gpa": e.c44_gpa,
                "validation_vacancy_ev": e.vacancy_ev, "validation_md_min_distance": e.md_min_distance,
                "validation_md_drift": e.md_nve_drift_mev_per_atom_ps,
            }
            out.update({k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)})
        return out


def plot(report: ValidationReport, path: Path) -> None:
    """One figure: EOS against the DFT points, dimer curves with ZBL, MD temperature and
    closest-pair traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for e in report.elements:
        if e.eos is not None:
            axes[0].plot(e.eos.volumes, e.eos.energies, "-", label=f"{e.element} {e.phase}")
            if e.eos.dft_volumes:
                axes[0].plot(e.eos.dft_volumes, e.eos.dft_energies, "o", mfc="none", label=str(e.eos.reference))
                axes[0].plot(e.eos.dft_volumes, e.eos.dft_energies_model, "x", label="potential, same cells")
        for p in e.phases:
            axes[0].plot(p.volumes, p.dft_energies, "o", mfc="none", label=p.reference)
            axes[0].plot(p.volumes, p.energies, "x-", label=f"potential, {p.phase}")
        axes[2].plot(e.md_time_ps, e.md_temperatures, label=e.element)
        axes[3].plot(e.md_time_ps, e.md_min_distances, label=e.element)
        if e.md_fused_threshold:
            axes[3].axhline(e.md_fused_threshold, ls="--", c="r", lw=0.8)
    for d in report.dimers:
        axes[1].plot(d.distances, d.energies, label=d.pair)
        axes[1].plot(d.distances, d.zbl_energies, ":", label=f"{d.pair} ZBL")
    lowest = min((min(d.energies) for d in report.dimers), default=0.0)
    axes[1].set_ylim(min(lowest, 0.0) - 1.0, 10.0)  # the wells and the rise into the ZBL wall
    titles = [("EOS", "V (A^3/atom)", "E (eV/atom)"), ("dimers", "r (A)", "E - E(apart) (eV)"),
              ("hot MD", "t (ps)", "T (K)"), ("hot MD", "t (ps)", "closest pair (A)")]
    for ax, (title, x, y) in zip(axes, titles):
        ax.set(title=title, xlabel=x, ylabel=y)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"generation {report.generation}: {report.one_line()[:150]}", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
