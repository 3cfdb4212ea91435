"""Packaging: what the command needs at run time ships inside the wheel.

The slow test builds the wheel, installs it the ordinary way (not editable) into
a fresh virtual environment and runs the demo from an empty folder, so nothing
can be found through the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from autopipec_hpc import __version__
from autopipec_hpc.cli import main
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.registry import MANIFEST, POTENTIAL_YACE, read_manifest, stage_potential

PROJECT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# The top-level folders the wheel carries as packages (pyproject.toml package-dir).
MAPPED = {"autopipec_hpc.job_templates": "job_templates", "autopipec_hpc.site_configs": "site_configs"}


def run(args: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# -- fast ----------------------------------------------------------------------
def test_every_subpackage_and_the_resource_folders_are_packaged():
    """pyproject lists packages by hand (package-dir mapping rules out packages.find)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(PROJECT).parts)
        for init in (PROJECT / "autopipec_hpc").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(setuptools["packages"]) == found | set(MAPPED)
    assert setuptools["package-dir"] == MAPPED
    assert setuptools["package-data"]["autopipec_hpc.job_templates"] == ["*.j2"]
    assert setuptools["package-data"]["autopipec_hpc.site_configs"] == ["*.yaml"]


def test_job_templates_are_read_from_the_package(tmp_path):
    import importlib.resources

    import jinja2

    from autopipec_hpc.errors import TrainingFailedError
    from autopipec_hpc.templates import template_environment

    env = template_environment()
    assert env.loader.searchpath == [str(importlib.resources.files("autopipec_hpc.job_templates"))]
    assert env.undefined is jinja2.StrictUndefined and env.keep_trailing_newline and "float" in env.filters
    for name in ("input.yaml.j2", "slurm_setup.sh.j2"):
        env.get_template(name)
    with pytest.raises(TrainingFailedError, match="job templates not found in"):
        template_environment(tmp_path / "missing")


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"autopipec-hpc {__version__}"
    assert __version__ == VERSION


@pytest.mark.parametrize("slurm", [False, True])
def test_site_template_loads_as_a_site_config(tmp_path, capsys, slurm):
    assert main(["site-template", *(["--slurm"] if slurm else [])]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    site = SiteConfig.from_yaml(path)
    assert site.scheduler == ("slurm" if slurm else "local")


@pytest.mark.pacemaker  # python-ace's version is what it records
def test_manifest_records_the_software_versions(tmp_path):
    """potential.json names autopipec-hpc's and pacemaker's (python-ace) versions."""
    import importlib.metadata

    tools = tmp_path / "bin"
    tools.mkdir()
    for name, body in (("pacemaker", "exit 0"), ("pace_yaml2yace", f'cp "$1" {POTENTIAL_YACE}')):
        script = tools / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    potential = tmp_path / "fit.yaml"
    potential.write_text("elements: [Cu]\n")
    staging = tmp_path / "staging"
    stage_potential(staging, potential, None, ["Cu"], 1.0, 2.0, {"Cu": -1.5}, 3, str(tools / "pacemaker"))
    data = json.loads((staging / MANIFEST).read_text())
    assert data["autopipec_hpc_version"] == VERSION
    assert data["pacemaker_version"] == importlib.metadata.version("python-ace")
    assert read_manifest(staging).generation == 3


def test_manifests_written_before_versions_were_recorded_still_load(tmp_path):
    old = {"generation": 1, "elements": ["Cu"], "zbl_inner": 1.0, "zbl_outer": 2.0,
           "reference_energies": {"Cu": -1.0}, "files": [], "published_at": 0.0}
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert read_manifest(tmp_path).pacemaker_version is None


# -- slow: the wheel in a fresh environment ----------------------------------------
def source_ignore(folder: str, names: list[str]) -> set[str]:
    """Leave out the environment, build and run outputs, and what the wheel does not need."""
    skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder) == PROJECT:
        skipped |= {".git", ".venv", "build", "dist", ".pytest_cache", "runs", "output", "example",
                    "tests", "bench"} & set(names)
    return skipped


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_the_demo_from_an_empty_folder(tmp_path):
    # Build from a copy, so the build leaves nothing (build/, egg-info) in the working tree.
    source = tmp_path / "source"
    shutil.copytree(PROJECT, source, ignore=source_ignore)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, source], timeout=600)
    (wheel,) = dist.glob("autopipec_hpc-*.whl")
    shutil.rmtree(source)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300)
    bin_ = venv / "bin"
    # python-ace only (its pyace evaluator fits the demo), no TensorFlow.
    run([bin_ / "python", "-m", "pip", "install", "--quiet", f"{wheel}[pacemaker]"], timeout=1800)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(bin_), "/usr/local/bin", "/usr/bin", "/bin"])
    env["MPLBACKEND"] = "Agg"

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([bin_ / "autopipec-hpc", *args], timeout=timeout, cwd=work, env=env)

    where = run(
        [bin_ / "python", "-c",
         "import autopipec_hpc, importlib.resources as r, pyace;"
         "print(autopipec_hpc.__file__); print(r.files('autopipec_hpc.job_templates')); print(pyace.__file__)"],
        timeout=120, cwd=work, env=env,
    ).stdout.split()
    site_packages = next((venv / "lib").glob("python3*/site-packages")).resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(site_packages), where
        assert not Path(path).resolve().is_relative_to(PROJECT), where

    assert cli("--version").stdout.strip() == f"autopipec-hpc {VERSION}"

    template = work.parent / "site-template.yaml"  # outside work/: the demo starts from an empty folder
    template.write_text(cli("site-template").stdout)
    assert SiteConfig.from_yaml(template).name == "local"
    assert list(work.iterdir()) == []

    demo = cli("demo", timeout=1800)
    published = [p for p in (work / "output" / "potentials").iterdir() if not p.name.startswith(".")]
    assert len(published) == 1, (published, demo.stdout[-3000:])
    assert (published[0] / "potential.yaml").is_file()
    manifest = json.loads((published[0] / MANIFEST).read_text())
    assert manifest["autopipec_hpc_version"] == VERSION
    assert manifest["pacemaker_version"] == "0.4.0rc1"  # pinned by the pacemaker extra
    assert (work / "runs").is_dir()
