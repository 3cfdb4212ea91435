"""Issue 18: the validation's properties against EMT copper (the labeller of the example
data, and an independent reference computed here with ASE's own tools), the failure checks
against a FAULT INJECTOR that fuses atoms, the gate, and the loop's stop on REJECTED."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.eos import EquationOfState

from autopipec_hpc.states import LoopAction, RecordState
from autopipec_hpc.testing.fault_calculator import FusingPairCalculator
from autopipec_hpc.validate import properties as props
from autopipec_hpc.validate.gate import verdict
from autopipec_hpc.validate.md import md_stability
from autopipec_hpc.validate.reference import LabelledStructure, ground_states, phase_of
from autopipec_hpc.validate.report import EOSResult, ElementResult, ValidationReport
from autopipec_hpc.validate.run import validate, validate_dimers
from autopipec_hpc.validate.settings import ValidationConfig, ValidationGates


def _emt_reference():
    """a0, B0 (GPa) from ASE's EquationOfState, and C11, C12, C44 (GPa) from energy
    curvatures (not stresses, unlike the code under test) of EMT copper."""
    cells = [bulk("Cu", "fcc", a=a) for a in np.linspace(3.5, 3.7, 21)]
    for c in cells:
        c.calc = EMT()
    v0, _, b = EquationOfState([c.get_volume() for c in cells], [c.get_potential_energy() for c in cells]).fit()
    a0 = (4 * v0) ** (1 / 3)
    cube = bulk("Cu", "fcc", a=a0, cubic=True)

    def curvature(strain_of):
        eps = np.linspace(-0.006, 0.006, 7)
        energies = []
        for e in eps:
            atoms = cube.copy()
            atoms.set_cell(cube.cell @ (np.eye(3) + strain_of(e)), scale_atoms=True)
            atoms.calc = EMT()
            energies.append(atoms.get_potential_energy())
        return 2 * np.polyfit(eps, energies, 2)[0] / cube.get_volume() / units.GPa

    c11 = curvature(lambda e: np.diag([e, 0, 0]))
    c44 = curvature(lambda e: np.array([[0, 0, 0], [0, 0, e / 2], [0, e / 2, 0]]))
    c12 = (3 * b / units.GPa - c11) / 2  # B = (C11 + 2 C12) / 3
    return a0, b / units.GPa, c11, c12, c44


def test_eos_and_elastic_constants_of_emt_copper_match_ase_s_own():
    a0, b0, c11, c12, c44 = _emt_reference()
    start = bulk("Cu", "fcc", a=3.75)  # 4 % off: the scan must find V0 by itself
    scan = props.eos_scan(start, EMT(), 0.1, 11)
    assert props.cubic_lattice_constant("fcc", scan.fit.v0) == pytest.approx(a0, rel=1e-3)
    assert scan.fit.b0_gpa == pytest.approx(b0, rel=0.02)
    elastic = props.cubic_elastic(bulk("Cu", "fcc", a=a0, cubic=True), EMT(), 0.01)
    assert (elastic.c11, elastic.c12, elastic.c44) == pytest.approx((c11, c12, c44), rel=0.03)
    assert elastic.born_stable
    assert not props.CubicElastic(100.0, 120.0, 50.0).born_stable  # C11 < C12: a shear instability


def test_vacancy_and_dimer_of_emt_copper():
    cell = props.supercell(bulk("Cu", "fcc", a=3.59, cubic=True), 100)
    assert len(cell) == 108
    e_vac = props.vacancy_formation_energy(cell, EMT())
    assert 0.5 < e_vac < 1.6  # EMT's Cu vacancy: about 1.1-1.3 eV relaxed
    curve = props.dimer_curve("Cu", "Cu", EMT(), 0.5, 5.0, 0.05)
    assert curve.repulsive and 1.8 < curve.r_min < 2.6 and curve.min_floor == pytest.approx(0.6 * 2 * 1.32)
    assert curve.check_distance == 1.0 and curve.energy_at_check > 10


def test_the_fault_injector_fails_the_dimer_and_fuses_atoms_in_hot_md():
    settings = ValidationConfig()
    dimer = validate_dimers(["Cu"], FusingPairCalculator(), settings, cutoff=5.0)[0]
    assert dimer.energy_at_check < 0 and dimer.r_min == pytest.approx(0.5) and not dimer.repulsive
    cell = props.supercell(bulk("Cu", "fcc", a=3.6, cubic=True), 32)
    bad = md_stability(cell, FusingPairCalculator(), 2000.0, 200, 20, 10, 1.0, 0.5, 3.0)
    assert "fused atoms" in bad.failure and bad.min_distance < bad.fused_threshold
    good = md_stability(cell, EMT(), 2000.0, 100, 20, 20, 1.0, 0.5, 3.0)
    assert good.stable and good.min_distance > 1.6 and good.nve_drift_mev_per_atom_ps is not None


def test_ground_states_and_phases_from_the_data():
    for phase, a in (("fcc", 3.6), ("bcc", 2.87), ("hcp", 2.55)):
        strained = bulk("Cu", phase, a=a).repeat(2)
        strained.set_cell(strained.cell @ np.diag([1.01, 0.99, 1.0]), scale_atoms=True)
        assert phase_of(strained) == phase
    data = [LabelledStructure(bulk("Cu", "fcc", a=a), -3.5 + 10 * (a - 3.6) ** 2, "fcc_ev")
            for a in np.linspace(3.5, 3.7, 6)]
    data.append(LabelledStructure(bulk("Cu", "bcc", a=2.87), -3.4, "bcc_ev"))
    (state,) = ground_states(data, ValidationConfig().eos_reference)
    assert (state.element, state.phase, state.eos_set, len(state.eos_points)) == ("Cu", "fcc", "fcc_ev", 6)


def _report(a0: float, ref_a0: float, b0: float = 140.0, ref_b0: float = 140.0, **element) -> ValidationReport:
    eos = EOSResult(volumes=[], energies=[], v0=a0**3 / 4, e0=-3.5, b0_gpa=b0, a0=a0, reference="DFT fcc_ev",
                    ref_v0=ref_a0**3 / 4, ref_b0_gpa=ref_b0, ref_a0=ref_a0)
    return ValidationReport(generation=3, dimers=[],
                            elements=[ElementResult(element="Cu", phase="fcc", eos=eos, **element)])


def test_the_gate_names_each_failed_property_and_each_gate_turns_off():
    settings = ValidationConfig()
    assert verdict(_report(3.60, 3.61, vacancy_ev=1.2, born_stable=True, md_failure=""), settings) == []
    failures = verdict(_report(3.70, 3.61, b0=100.0, vacancy_ev=-0.2, born_stable=False, c11_gpa=100.0,
                               c12_gpa=120.0, c44_gpa=50.0, md_temperature_k=2600.0,
                               md_failure="fused atoms at step 40: a pair at 0.90 A"), settings)
    joined = "; ".join(failures)
    for named in ("a0 3.7 vs 3.61", "B0 100.0 vs 140.0", "Born", "vacancy formation energy -0.20", "fused atoms"):
        assert named in joined, joined
    off = ValidationConfig(gates=ValidationGates(a0_tolerance=False, b0_tolerance=False, elastic_stability=False,
                                                 vacancy_positive=False, md_stable=False))
    assert verdict(_report(3.70, 3.61, b0=100.0, vacancy_ev=-0.2, born_stable=False, md_failure="NaN"), off) == []


def test_validate_emt_copper_end_to_end_passes_and_keeps_its_headline():
    data = [LabelledStructure(bulk("Cu", "fcc", a=a), 0.0, "fcc_ev") for a in np.linspace(3.5, 3.7, 6)]
    data += [LabelledStructure(bulk("Cu", "bcc", a=a), 0.0, "bcc_ev") for a in np.linspace(2.8, 2.95, 6)]
    for s in data:
        s.atoms.calc = EMT()
        object.__setattr__(s, "energy", s.atoms.get_potential_energy())
    settings = ValidationConfig(supercell_atoms=32, md_steps=50, md_nve_steps=20, md_quench_steps=20)
    states = ground_states(data, settings.eos_reference)
    report = validate(EMT(), states, ["Cu"], settings, generation=1, cutoff=5.0)
    assert report.passed, report.failures
    eos = report.elements[0].eos
    assert eos.reference == "DFT fcc_ev" and eos.a0 == pytest.approx(eos.ref_a0, rel=2e-3)
    (bcc,) = report.elements[0].phases  # the other phase's E(V) set: the potential (here EMT itself) vs its labels
    assert bcc.phase == "bcc" and bcc.above_ground_mev == pytest.approx(bcc.ref_above_ground_mev, abs=0.5)
    assert bcc.above_ground_mev > 0  # EMT copper: fcc below bcc
    headline = report.headline()
    assert headline["validation"] == "passed" and headline["validation_a0"] == pytest.approx(eos.a0)
    assert headline["validation_element"] == "Cu"
    two = report.model_copy(update={"elements": [report.elements[0], report.elements[0].model_copy(
        update={"element": "Al"})]})
    assert two.headline()["validation_element"] == "Cu (1 of 2)"  # the figures say whose they are


def test_a_rejected_generation_stops_the_loop_with_its_line(tmp_path):
    from autopipec_hpc.active.loop import next_step
    from autopipec_hpc.store import DatabaseManager

    db = DatabaseManager(str(tmp_path / "s.db"))
    generation, run_dir = db.claim(None, lambda n: tmp_path / f"gen-{n}")
    reason = "validation failed: Cu fcc hot MD at 2600 K: fused atoms at step 40: a pair at 0.90 A"
    db.update_record(generation, run_dir, RecordState.REJECTED, reason=reason)
    assert db.update_record(generation, run_dir, RecordState.SUCCEEDED) is False  # final: forward only
    step = next_step(db, generations=3)
    assert step.action == LoopAction.REJECTED and "fused atoms at step 40" in step.describe()


@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_toy_fit_is_rejected_by_name_nothing_published_and_the_loop_stops(tmp_path, example_db, local_site):
    """20 iterations of 16 functions: trained and evaluated, then REJECTED by its validation
    job, the failed properties in the record's one line; no potential, not even a staged one."""
    import json
    from pathlib import Path

    from autopipec_hpc.active.loop import next_step
    from autopipec_hpc.errors import ValidationRejectedError
    from autopipec_hpc.generation import Generation
    from autopipec_hpc.registry import potentials_root
    from autopipec_hpc.states import JobRole, JobState
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.submission import submit_generation
    from tests.helpers import run_cli, toy_validated_config

    site = local_site()
    sub = submit_generation(example_db, site, toy_validated_config())
    assert sub.jobs.validate_job is not None and sub.jobs.validate_job.role == JobRole.VALIDATE
    generation = Generation.open(sub.spec.run_dir)
    with pytest.raises(ValidationRejectedError, match="REJECTED, not published: validation failed: "):
        generation.wait(900)
    record = generation.record()
    report = json.loads((Path(sub.spec.run_dir) / "validation" / "validation.json").read_text())
    assert record.status == RecordState.REJECTED and report["failures"]
    assert record.reason == "validation failed: " + "; ".join(report["failures"])
    assert record.validation == "; ".join(report["failures"]) and record.validation_a0 is not None
    assert record.validation_element == "Cu"
    assert record.test_energy_rmse_mev is not None and record.potential_path is None  # evaluated, never published
    assert generation.job_states()[JobRole.VALIDATE] == JobState.COMPLETED  # a verdict, not a crash
    assert not any(potentials_root(site.output_dir).iterdir()), "something was published or left staged"
    step = next_step(DatabaseManager(example_db), generations=2)
    assert step.action == LoopAction.REJECTED and report["failures"][0] in step.describe()
    shown = run_cli("results", "--generation", "1", "--db", example_db)
    assert shown.returncode == 0 and "generation 1 validation" in shown.stdout and "REJECTED" in shown.stdout


class _AnsweringScheduler:
    """FAULT INJECTOR, not a scheduler: answers fixed job states, to show the reconciliation
    a validation job killed or cancelled without paying for the fit before it."""

    name = "local"

    def __init__(self, states):
        self._states = states

    def states(self, jobs):
        return [self._states[job.role] for job in jobs]


@pytest.mark.parametrize("validate_state, stopped, outcome", [
    ("FAILED", False, RecordState.FAILED),  # killed (kill -9, a node lost)
    ("CANCELLED", True, RecordState.CANCELLED),  # cancelled while it ran: its stop marker
])
def test_a_validation_job_that_died_ends_the_record_and_publishes_nothing(tmp_path, local_site, validate_state,
                                                                           stopped, outcome):
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.generation import Generation
    from autopipec_hpc.registry import potentials_root, validating_dir
    from autopipec_hpc.run_folder import RunSpec, new_run_folder
    from autopipec_hpc.scheduler.base import SubmittedJob, SubmittedJobs
    from autopipec_hpc.states import JobRole, JobState
    from autopipec_hpc.store import DatabaseManager

    site = local_site()
    db = DatabaseManager(site.database)
    generation, run_dir = db.claim(None, lambda n: new_run_folder(site.work_dir, n).path)
    spec = RunSpec(generation=generation, run_dir=str(run_dir), database=site.database,
                   output_dir=str(site.output_dir), site=site, config=tiny_train_config())
    spec.save()
    job = {role: SubmittedJob(scheduler="local", folder=str(run_dir / "submitit"), job_id=str(k), role=role,
                              name=f"autopipec-g1-{role}-0123abcd")
           for k, role in ((1, JobRole.TRAIN), (2, JobRole.EVALUATE), (3, JobRole.VALIDATE))}
    SubmittedJobs(train=job[JobRole.TRAIN], evaluate=job[JobRole.EVALUATE], validate_job=job[JobRole.VALIDATE]).save(run_dir)
    assert SubmittedJobs.load(run_dir).by_role(JobRole.VALIDATE).job_id == "3"
    db.update_record(generation, run_dir, RecordState.RUNNING, reason="evaluated; validating")
    waiting = validating_dir(site.output_dir, generation, run_dir)
    waiting.mkdir(parents=True)
    if stopped:
        spec.folder.stop_marker(JobRole.VALIDATE).write_text("SIGTERM")
    answers = {JobRole.TRAIN: JobState.COMPLETED, JobRole.EVALUATE: JobState.COMPLETED,
               JobRole.VALIDATE: JobState(validate_state)}
    record = Generation(spec, SubmittedJobs.load(run_dir), _AnsweringScheduler(answers), db, follow=False).reconcile()
    assert record.status == outcome
    assert f"validation job 3 {validate_state}" in record.reason, record.reason
    assert not any(potentials_root(site.output_dir).iterdir()), "a potential was left published or waiting"
