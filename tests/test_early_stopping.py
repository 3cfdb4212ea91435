"""Early stopping: a fit ends when its test loss stops improving (issue 19, item 4).

pacemaker's own mechanism (``fit.min_relative_test_loss_per_iter`` and
``fit.early_stopping_patience``, pyace/generalfit.py) raises StopIteration in scipy's
callback; scipy returns the last iterate and pacemaker writes its output as after
maxiter. It needs test metrics, which only the tensorpot evaluator computes.
"""

from __future__ import annotations

import pytest
import yaml

from autopipec_hpc.config import TrainConfig
from autopipec_hpc.errors import ConfigError
from autopipec_hpc.pacemaker.files import render_input, stopped_early


def fit_section(config: TrainConfig, test_files=("/d/test.pckl.gzip",)) -> tuple[dict, dict]:
    doc = yaml.safe_load(render_input(config, ["Cu"], ["/d/train.pckl.gzip"], list(test_files), "tensorpot"))
    return doc["fit"], doc["backend"]


def test_early_stopping_is_on_by_default_and_reaches_pacemaker():
    fit, backend = fit_section(TrainConfig())
    assert fit["min_relative_test_loss_per_iter"] == pytest.approx(1e-3)
    assert fit["early_stopping_patience"] == 50
    # pacemaker sees the test loss every display_step iterations and its window covers one step
    # less than the patience: a fifth of the patience keeps it close to what was asked.
    assert backend["display_step"] == 10


def test_early_stopping_settings_are_rendered_as_given():
    fit, backend = fit_section(TrainConfig(early_stopping_min_improvement=2e-4, early_stopping_patience=120))
    assert fit["min_relative_test_loss_per_iter"] == pytest.approx(2e-4)
    assert fit["early_stopping_patience"] == 120 and backend["display_step"] == 24


def test_no_early_stopping_without_a_test_set_or_when_turned_off():
    fit, backend = fit_section(TrainConfig(), test_files=())
    assert "min_relative_test_loss_per_iter" not in fit and "early_stopping_patience" not in fit
    assert backend["display_step"] == 25  # maxiter // 20, as before
    fit, backend = fit_section(TrainConfig(early_stopping_min_improvement=None))
    assert "min_relative_test_loss_per_iter" not in fit and backend["display_step"] == 25


@pytest.mark.parametrize(
    "text,key",
    [
        ("early_stopping_min_improvement: 0\n", "early_stopping_min_improvement"),
        ("early_stopping_min_improvement: -1e-3\n", "early_stopping_min_improvement"),
        ("early_stopping_min_improvement: 1.0\n", "early_stopping_min_improvement"),
        ("early_stopping_min_improvement: .nan\n", "early_stopping_min_improvement"),
        ("early_stopping_min_improvement: lots\n", "early_stopping_min_improvement"),
        ("early_stopping_patience: 0\n", "early_stopping_patience"),
        ("early_stopping_patience: 2.5\n", "early_stopping_patience"),
        ("early_stoping_patience: 10\n", "unknown key 'early_stoping_patience'"),
    ],
)
def test_invalid_early_stopping_settings_are_refused_by_name(tmp_path, text, key):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_yaml(path)


def test_null_turns_early_stopping_off(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("early_stopping_min_improvement: null\n")
    assert TrainConfig.from_yaml(path).early_stopping_min_improvement is None


def test_stopped_early_reads_pacemakers_log(tmp_path):
    assert not stopped_early(tmp_path)  # no log at all
    (tmp_path / "log.txt").write_text("2026-12-03 I - Iteration #5\n2026-12-03 I - Fitting took 3 s\n")
    assert not stopped_early(tmp_path)
    with open(tmp_path / "log.txt", "a") as log:
        log.write("2026-12-03 17:45:22,182 I - EARLY STOPPING: Too small or even positive TEST loss change "
                  "(best=-3.76e-01  / iter, last=-2.97e-01/iter, threshold = -5.00e-01/iter) within last 5 "
                  "iterations. Stopping\n")
    assert stopped_early(tmp_path)


def _example_dataset(folder):
    """The demo's 30 EMT copper cells as pacemaker datasets, with a test split."""
    from autopipec_hpc.dataset_prep import DatasetBuilder, DatasetSettings
    from autopipec_hpc.example_data import example_structures

    structures = []
    for k, (atoms, ctype) in enumerate(example_structures()):
        atoms.info.update(db_id=k + 1, config_type=ctype)
        structures.append(atoms)
    return DatasetBuilder(DatasetSettings()).prepare_dataset(structures, folder)


@pytest.mark.pacemaker
@pytest.mark.slow
def test_a_fit_stopped_early_ends_as_a_normal_fit(tmp_path):
    """A real tensorpot fit told to stop at once (any improvement under 50 % per iteration
    counts as none) ends well before maxiter, exits 0 and leaves its potential and metrics:
    the wrapper returns a result (no TrainingFailedError, no divergence) marked stopped_early."""
    pytest.importorskip("tensorpotential")
    from pathlib import Path

    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.pacemaker.files import OUTPUT_POTENTIAL, read_metrics_table
    from autopipec_hpc.pacemaker.run import PacemakerWrapper
    from tests.helpers import PACEMAKER

    dataset = _example_dataset(tmp_path / "ds")
    assert dataset.test_ids
    config = tiny_train_config().model_copy(
        update={"maxiter": 200, "early_stopping_patience": 5, "early_stopping_min_improvement": 0.5})
    result = PacemakerWrapper(command=str(PACEMAKER), evaluator="tensorpot", threads=2).run_training(
        dataset.train_paths, dataset.test_paths, config, run_dir=tmp_path / "attempt")
    run = Path(result.run_dir)
    assert result.stopped_early
    assert 5 <= result.iterations < 50, result.iterations
    assert (run / OUTPUT_POTENTIAL).exists() and (run / "test_pred.pckl.gzip").exists()
    assert result.test_rmse_energy_mev is not None
    assert int(read_metrics_table(run / "metrics.txt")["iter_num"].max()) == result.iterations


@pytest.mark.pacemaker
@pytest.mark.slow
def test_early_stopping_raised_after_the_last_iteration_still_ends_as_a_normal_fit(tmp_path):
    """When the optimizer has ended (maxiter), tensorpot computes the test metrics once more
    outside scipy; if that pass completes early stopping's window, pacemaker's
    TestLossChangeTooSmallException escapes the fit and pacemaker exits 1 without its output
    potential (found on a warm start in the exploring loop). maxiter = patience - 1 with
    display_step 1 puts the window's completion exactly on that last pass. Every iteration
    ran: the wrapper keeps the last iterate and reports the fit as stopped early, not FAILED."""
    pytest.importorskip("tensorpotential")
    from pathlib import Path

    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.pacemaker.files import INTERIM_POTENTIAL, OUTPUT_POTENTIAL, STDOUT_LOG
    from autopipec_hpc.pacemaker.run import PacemakerWrapper
    from tests.helpers import PACEMAKER

    dataset = _example_dataset(tmp_path / "ds")
    config = tiny_train_config().model_copy(
        update={"maxiter": 9, "early_stopping_patience": 10, "early_stopping_min_improvement": 0.5})
    result = PacemakerWrapper(command=str(PACEMAKER), evaluator="tensorpot", threads=2).run_training(
        dataset.train_paths, dataset.test_paths, config, run_dir=tmp_path / "attempt")
    run = Path(result.run_dir)
    out = (run / STDOUT_LOG).read_text()
    assert "TestLossChangeTooSmallException" in out.strip().splitlines()[-1]  # pacemaker did exit on it
    assert result.stopped_early and result.iterations == 9
    assert (run / OUTPUT_POTENTIAL).read_text() == (run / INTERIM_POTENTIAL).read_text()
