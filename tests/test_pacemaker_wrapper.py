"""PacemakerWrapper: the rendered input pacemaker accepts, output parsing, failures."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from autopipec_hpc.config import TrainConfig
from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings
from autopipec_hpc.errors import TrainingDivergenceError, TrainingFailedError
from autopipec_hpc.example_data import example_structures, tiny_train_config
from autopipec_hpc.pacemaker.files import render_input
from autopipec_hpc.pacemaker.run import IterationParser, PacemakerWrapper
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker
from tests.helpers import PACEMAKER


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    structures = []
    for k, (atoms, ctype) in enumerate(example_structures()):
        atoms.info.update(db_id=k + 1, config_type=ctype)
        structures.append(atoms)
    out = tmp_path_factory.mktemp("ds")
    return DatasetBuilder(DatasetSettings()).prepare_dataset(structures, out)


def render(config: TrainConfig, evaluator: str = "pyace") -> dict:
    return yaml.safe_load(render_input(config, ["Cu"], ["/d/train.pckl.gzip"], ["/d/test.pckl.gzip"], evaluator))


def test_rendered_input_has_backend_seed_kappa_and_our_holdout():
    text = render_input(TrainConfig(seed=7), ["Cu"], ["/d/train.pckl.gzip"], ["/d/test.pckl.gzip"], "tensorpot")
    doc = yaml.safe_load(text)
    assert doc["seed"] == 7
    assert doc["backend"]["evaluator"] == "tensorpot"
    assert doc["fit"]["loss"]["kappa"] == pytest.approx(0.3)  # the balanced default (0.7 / 0.3)
    assert doc["fit"]["loss"]["L1_coeffs"] == 1e-8 and doc["fit"]["loss"]["L2_coeffs"] == 1e-8
    assert doc["data"]["test_filename"] == ["/d/test.pckl.gzip"]
    assert doc["data"]["reference_energy"] == 0
    assert "repulsion" not in doc["fit"] and "repulsion: auto" not in text.replace("`repulsion: auto`", "")


def test_each_setting_reaches_its_pacemaker_key():
    doc = render(TrainConfig(cutoff=6.5, b_basis_size=77, max_degree=4, maxiter=9, optimizer="L-BFGS-B",
                             batch_size=13, l2_coeffs=1e-5))
    assert doc["potential"]["bonds"]["ALL"]["rcut"] == 6.5
    assert doc["potential"]["functions"]["number_of_functions_per_element"] == 77
    assert doc["potential"]["functions"]["ALL"]["nradmax_by_orders"] == [15, 6, 4, 3]
    assert doc["fit"]["maxiter"] == 9 and doc["fit"]["optimizer"] == "L-BFGS-B"
    assert doc["backend"]["batch_size"] == 13 and doc["fit"]["loss"]["L2_coeffs"] == 1e-5
    assert doc["backend"]["parallel_mode"] == "serial"


def test_changing_cutoff_changes_the_file():
    a = render_input(TrainConfig(cutoff=5.0), ["Cu"], ["t"], ["v"], "pyace")
    b = render_input(TrainConfig(cutoff=6.0), ["Cu"], ["t"], ["v"], "pyace")
    assert a != b and "rcut: 6.0" in b


@pytest.mark.pacemaker
def test_pacemaker_dry_run_accepts_the_rendered_input(dataset, tmp_path):
    text = render_input(tiny_train_config(), dataset.elements, [str(p) for p in dataset.train_paths],
                        [str(p) for p in dataset.test_paths], "pyace")
    (tmp_path / "input.yaml").write_text(text)
    done = subprocess.run([str(PACEMAKER), "input.yaml", "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Dry run is finished" in done.stdout + done.stderr + (tmp_path / "log.txt").read_text()


def test_iteration_parser_reads_both_of_pacemakers_formats():
    parser = IterationParser()
    short = ("Eval 1050: loss=0.0095   2026-11-28 - INFO - Iteration   #7    (1051 evals):     Loss: 9.5033e-03 "
             "| RMSE Energy(low): 37.99 (37.99) meV/at | Forces(low): 97.14 (97.14) meV/A | Time/eval: 14 mcs/at")
    p = parser.feed(short)
    assert (p.iteration, p.loss, p.rmse_energy_mev, p.rmse_force_mev) == (7, 9.5033e-03, 37.99, 97.14)
    assert parser.feed("Iteration:  #8   Loss:    Total:  3.9435e-01 (100%) ") is None
    assert parser.feed("          Energy/at, meV/at   Energy_low/at, meV/at      Force, meV/A   ") is None
    p = parser.feed("   RMSE:          486.48               486.48               617.61                  617.61")
    assert (p.iteration, p.loss, p.rmse_energy_mev, p.rmse_force_mev) == (8, 0.39435, 486.48, 617.61)


@pytest.mark.pacemaker
@pytest.mark.slow
def test_real_tiny_fit_streams_progress_and_reads_metrics(dataset, tmp_path):
    seen = []
    wrapper = PacemakerWrapper(command=str(PACEMAKER), evaluator="pyace", on_progress=seen.append)
    # Eight iterations of a toy fit are far from fitted (the example data's compressed frames
    # give ~1.4 eV/atom): this test is about progress and metrics, not the divergence guard.
    config = tiny_train_config().model_copy(update={"maxiter": 8, "max_energy_rmse_mev": 1e5,
                                                    "max_force_rmse_mev": 1e6})
    result = wrapper.run_training(dataset.train_paths, dataset.test_paths, config, run_dir=tmp_path / "attempt")
    run = Path(result.run_dir)
    assert result.iterations == 8
    assert [s.iteration for s in seen][-1] == 8
    assert 0 < result.train_rmse_energy_mev < 1e5 and 0 < result.train_rmse_force_mev < 1e6
    for name in ("input.yaml", "log.txt", "metrics.txt", "pacemaker.out", "output_potential.yaml",
                 "test_pred.pckl.gzip", "training.json"):
        assert (run / name).exists(), name
    # a second attempt never reuses the directory
    again = wrapper.run_training(dataset.train_paths, dataset.test_paths, config.model_copy(update={"maxiter": 1}),
                                 run_dir=tmp_path / "attempt")
    assert again.run_dir != result.run_dir


def test_fault_injector_crash_raises_with_log_tail(dataset, tmp_path):
    fake = make_fault_pacemaker(tmp_path, "crash")
    with pytest.raises(TrainingFailedError, match="exited with code 1") as info:
        PacemakerWrapper(command=str(fake), evaluator="pyace").run_training(
            dataset.train_paths, dataset.test_paths, tiny_train_config(), run_dir=tmp_path / "run")
    assert "bad_alloc" in info.value.log_tail


def test_fault_injector_divergence_raises_divergence_error(dataset, tmp_path):
    fake = make_fault_pacemaker(tmp_path, "diverge")
    with pytest.raises(TrainingDivergenceError, match="energy RMSE 1e\\+09 meV/atom exceeds"):
        PacemakerWrapper(command=str(fake), evaluator="pyace").run_training(
            dataset.train_paths, dataset.test_paths, tiny_train_config(), run_dir=tmp_path / "run")


def test_fault_injector_hang_is_killed_with_its_process_group(dataset, tmp_path):
    fake = make_fault_pacemaker(tmp_path, "hang")
    config = tiny_train_config().model_copy(update={"timeout_hours": 2.0 / 3600})
    start = time.monotonic()
    with pytest.raises(TrainingFailedError, match="exceeded the timeout"):
        PacemakerWrapper(command=str(fake), evaluator="pyace").run_training(
            dataset.train_paths, dataset.test_paths, config, run_dir=tmp_path / "run")
    assert time.monotonic() - start < 30
    grandchild = int((tmp_path / "run" / "grandchild.pid").read_text())
    assert not pid_alive(grandchild), "the fault injector's grandchild survived the timeout"


def test_missing_command_is_a_training_failure(dataset, tmp_path):
    with pytest.raises(TrainingFailedError, match="not found"):
        PacemakerWrapper(command="/nonexistent/pacemaker").run_training(
            dataset.train_paths, dataset.test_paths, tiny_train_config(), run_dir=tmp_path / "run")


def test_warm_start_with_ladder_step_is_refused_before_the_database_is_read(tmp_path):
    """`submit --from-generation N` and the loop set warm_start with model_copy, past
    TrainConfig's validation: check_warm_start refuses the combination by name."""
    from autopipec_hpc.errors import ConfigError
    from autopipec_hpc.warm_start import check_warm_start

    config = TrainConfig(ladder_step=10).model_copy(update={"warm_start": 1})
    with pytest.raises(ConfigError, match="warm_start from generation 1: ladder_step cannot be combined"):
        check_warm_start(str(tmp_path / "absent.db"), config)
    assert not (tmp_path / "absent.db").exists()


def test_the_wrapper_never_passes_a_start_potential_to_a_ladder_fit(dataset, tmp_path):
    # A requeued ladder fit would resume with `-p interim_potential_0.yaml` and start from nothing.
    fake = make_fault_pacemaker(tmp_path, "crash")
    config = tiny_train_config().model_copy(update={"ladder_step": 4})
    with pytest.raises(TrainingFailedError, match="ladder_step cannot be combined with a warm start"):
        PacemakerWrapper(command=str(fake), evaluator="pyace").run_training(
            dataset.train_paths, dataset.test_paths, config, run_dir=tmp_path / "run",
            initial_potential=tmp_path / "parent.yaml")
    assert not (tmp_path / "run" / "pacemaker.out").exists()  # pacemaker was never started


def test_submit_refuses_a_ladder_warm_start_in_one_line(tmp_path):
    from tests.helpers import run_cli

    (tmp_path / "train.yaml").write_text("ladder_step: 10\n")
    done = run_cli("submit", "--db", str(tmp_path / "s.db"), "--config", str(tmp_path / "train.yaml"),
                   "--from-generation", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ladder_step" in lines[0] and "warm start" in lines[0], done.stderr


def test_loop_refuses_a_ladder_warm_start_before_generation_one(tmp_path):
    from tests.helpers import run_cli

    (tmp_path / "train.yaml").write_text("ladder_step: 10\n")
    done = run_cli("loop", "--db", str(tmp_path / "s.db"), "--config", str(tmp_path / "train.yaml"),
                   "--generations", "2", "--select", "2", "--calculator", "ase.calculators.emt:EMT", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ladder_step" in lines[0] and "--cold" in lines[0], done.stderr
    assert not (tmp_path / "s.db").exists()
