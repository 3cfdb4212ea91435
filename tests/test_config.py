"""Typed configs: defaults, refusal of unknown keys by name, the pacemaker mapping."""

from __future__ import annotations

import pytest

from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_train_config_defaults_are_a_small_production_fit():
    c = TrainConfig()
    assert (c.cutoff, c.b_basis_size, c.max_degree, c.energy_weight, c.force_weight) == (5.0, 100, 4, 0.7, 0.3)
    assert c.kappa == pytest.approx(0.3)  # pacemaker's advice; issue 19
    assert c.maxiter == 500 and c.timeout_hours == 24.0 and c.batch_size_reduction


@pytest.mark.parametrize(
    "text,key",
    [
        ("cutoff: .inf\n", "cutoff"),
        ("cutoff: .nan\n", "cutoff"),
        ("seed: -5\n", "seed"),
        ("ladder_step: 0\n", "ladder_step"),
        ("ladder_step: 1.5\n", "ladder_step"),
        ("ladder_step: true\n", "ladder_step"),
        ("ladder_type: sideways\n", "ladder_type"),
        ("fit_cycles: 0\n", "fit_cycles"),
        ("noise_relative_sigma: -0.1\n", "noise_relative_sigma"),
        ("reference_energies: {Cu: .nan}\n", "reference_energies"),
    ],
)
def test_settings_that_cannot_run_are_refused_by_name(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_yaml(write(tmp_path, text))


def test_large_fit_settings_map_onto_pacemaker():
    import yaml

    from autopipec_hpc.pacemaker.files import render_input

    config = TrainConfig(ladder_step=0.25, ladder_type="power_order", fit_cycles=3, noise_relative_sigma=0.02,
                         batch_size=20, batch_size_reduction=False)
    doc = yaml.safe_load(render_input(config, ["Cu"], ["/d/t.pckl.gzip"], [], "tensorpot"))
    assert doc["fit"]["ladder_step"] == 0.25 and doc["fit"]["ladder_type"] == "power_order"
    assert doc["fit"]["fit_cycles"] == 3 and doc["fit"]["noise_relative_sigma"] == 0.02
    assert doc["backend"]["batch_size"] == 20 and doc["backend"]["batch_size_reduction"] is False
    plain = yaml.safe_load(render_input(TrainConfig(), ["Cu"], ["/d/t.pckl.gzip"], [], "tensorpot"))
    assert "ladder_step" not in plain["fit"] and "fit_cycles" not in plain["fit"]
    assert plain["backend"]["batch_size_reduction"] is True
    assert TrainConfig(ladder_step=50).ladder_step == 50


@pytest.mark.pacemaker
def test_parameter_count_is_pacemakers():
    from autopipec_hpc.pacemaker.files import count_parameters

    # pacemaker reports "Number of params./funcs: 464/100" for this basis
    assert count_parameters(TrainConfig(b_basis_size=100, max_degree=4), ["Cu"]) == 464
    assert count_parameters(TrainConfig(b_basis_size=16, max_degree=2), ["Cu"]) == 116


def test_kappa_is_the_force_share_of_the_loss():
    assert TrainConfig(energy_weight=1, force_weight=100).kappa == pytest.approx(100 / 101)
    assert TrainConfig(energy_weight=1, force_weight=0).kappa == 0.0
    assert TrainConfig(energy_weight=1, force_weight=1).kappa == 0.5


def test_kappa_key_sets_the_weights(tmp_path):
    c = TrainConfig.from_yaml(write(tmp_path, "kappa: 0.2\n"))
    assert c.kappa == pytest.approx(0.2) and (c.energy_weight, c.force_weight) == pytest.approx((0.8, 0.2))
    assert TrainConfig.model_validate(c.model_dump()).kappa == pytest.approx(0.2)


@pytest.mark.parametrize("text", ["kappa: 0\n", "kappa: 1\n", "kappa: 1.5\n", "kappa: .nan\n", "kappa: true\n",
                                  "kappa: x\n", "kappa: 0.3\nforce_weight: 1\n", "kappa: 0.3\nenergy_weight: 1\n"])
def test_kappa_key_is_validated_and_excludes_the_weights(tmp_path, text):
    with pytest.raises(ConfigError, match="kappa"):
        TrainConfig.from_yaml(write(tmp_path, text))


def test_max_degree_selects_body_orders():
    c = TrainConfig(max_degree=3)
    assert c.nradmax_by_orders == [15, 6, 4] and c.lmax_by_orders == [0, 3, 3]


def test_unknown_train_key_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'kapa'"):
        TrainConfig.from_yaml(write(tmp_path, "cutoff: 6.0\nkapa: 0.3\n"))


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'cutoff'"):
        TrainConfig.from_yaml(write(tmp_path, "cutoff: -1\n"))
    with pytest.raises(ConfigError, match="zbl_inner"):
        TrainConfig.from_yaml(write(tmp_path, "zbl_inner: 3.0\nzbl_outer: 2.0\n"))


def test_unknown_site_key_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.gpu'"):
        SiteConfig.from_yaml(write(tmp_path, "scheduler: slurm\ntrain:\n  gpu: 1\n"))


@pytest.mark.parametrize(
    "text,key",
    [
        ("train:\n  partition: 'gpu; rm -rf ~'\n", "train.partition"),
        ("name: 'a b'\n", "name"),
        ("pacemaker:\n  command: 'pacemaker && curl x'\n", "pacemaker.command"),
        ("setup:\n  - \"module load x\\nrm -rf ~\"\n", "setup"),
        ("python: '/bin/python; id'\n", "python"),
    ],
)
def test_values_that_could_inject_shell_are_refused(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SiteConfig.from_yaml(write(tmp_path, text))


def test_shipped_site_configs_are_valid():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "site_configs"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert "local.yaml" in names
    for path in folder.glob("*.yaml"):
        SiteConfig.from_yaml(path)


def test_the_select_job_asks_for_the_evaluation_resources_unless_the_site_says(tmp_path):
    site = SiteConfig.from_yaml(write(tmp_path, "evaluate:\n  partition: cpu\n  cpus: 3\n"))
    assert site.select is None and site.select_resources == site.evaluate
    site = SiteConfig.from_yaml(write(tmp_path, "evaluate:\n  partition: cpu\nselect:\n  partition: big\n  cpus: 8\n"))
    assert (site.select_resources.partition, site.select_resources.cpus) == ("big", 8)
    assert list(site.job_resources()) == ["train", "evaluate", "select", "explore", "label", "validate"]
    site = SiteConfig.from_yaml(write(tmp_path, "evaluate:\n  cpus: 3\nvalidate:\n  cpus: 2\nlabel:\n  cpus: 4\n"))
    assert [site.resources(r).cpus for r in ("explore", "label", "validate")] == [3, 4, 2]
    # run.json round trip: `validate:` by its YAML name
    assert SiteConfig.model_validate_json(site.model_dump_json()) == site
    with pytest.raises(ConfigError, match="select.cpus"):
        SiteConfig.from_yaml(write(tmp_path, "select:\n  cpus: 0\n"))


def test_ladder_step_with_a_warm_start_is_refused_by_name(tmp_path):
    # python-ace issue #39: `pacemaker -p parent.yaml` with ladder_step grows the ladder from an
    # empty potential, so the warm start would silently be a cold start.
    with pytest.raises(ConfigError, match="ladder_step cannot be combined with a warm start"):
        TrainConfig.from_yaml(write(tmp_path, "ladder_step: 10\nwarm_start: 1\n"))
    assert TrainConfig(ladder_step=10).warm_start is None and TrainConfig(warm_start=1).ladder_step is None


def test_a_warm_start_runs_at_most_warm_start_maxiter(tmp_path):
    assert TrainConfig().warm_start_budget == 150  # of the default 500
    assert TrainConfig(maxiter=20).warm_start_budget == 20  # never more than maxiter
    assert TrainConfig(warm_start_maxiter=None).warm_start_budget == 500
    assert TrainConfig.from_yaml(write(tmp_path, "maxiter: 1000\nwarm_start_maxiter: 400\n")).warm_start_budget == 400
    with pytest.raises(ConfigError, match="warm_start_maxiter"):
        TrainConfig.from_yaml(write(tmp_path, "warm_start_maxiter: 0\n"))
