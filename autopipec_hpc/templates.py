"""The Jinja templates and site configs that travel inside the wheel.

The top-level ``job_templates/`` and ``site_configs/`` folders are packaged as
``autopipec_hpc.job_templates`` and ``autopipec_hpc.site_configs`` (pyproject.toml).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

from autopipec_hpc import __version__
from autopipec_hpc.errors import TrainingFailedError

if TYPE_CHECKING:
    import jinja2


# The top-level job_templates/ folder, packaged into the wheel under this name (pyproject.toml).
TEMPLATES_PACKAGE = "autopipec_hpc.job_templates"


def yaml_float(value: float) -> str:
    """A float every YAML reader parses as a float: '1e-08' is a string to YAML 1.1."""
    text = repr(float(value))
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def template_environment(directory: Path | None = None) -> jinja2.Environment:
    """Jinja2 over ``directory``; by default the job templates installed with the package."""
    import jinja2  # only where something is rendered: the CLI starts without it

    if directory is None:
        try:
            directory = Path(str(importlib.resources.files(TEMPLATES_PACKAGE)))
        except ModuleNotFoundError:
            raise TrainingFailedError(
                f"job templates not found: package {TEMPLATES_PACKAGE} is not installed"
            ) from None
    if not directory.is_dir():
        raise TrainingFailedError(f"job templates not found in {directory}")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["float"] = yaml_float
    return env


# The top-level site_configs/ folder, packaged into the wheel under this name (pyproject.toml).
SITE_CONFIGS = "autopipec_hpc.site_configs"


def packaged_site(name: str) -> Path:
    """A site config installed with the package, e.g. ``local.yaml``."""
    return Path(str(importlib.resources.files(SITE_CONFIGS).joinpath(name)))


DEFAULT_SITE = packaged_site("local.yaml")


SLURM_EXAMPLE_SITE = "example-gpu-cluster.yaml"


def site_template(slurm: bool = False) -> str:
    """The commented site config to start from: the packaged local or SLURM example."""
    name = SLURM_EXAMPLE_SITE if slurm else DEFAULT_SITE.name
    body = packaged_site(name).read_text()
    header = f"# site_configs/{name} of autopipec-hpc {__version__}; check your copy: autopipec-hpc check-site FILE\n"
    return header + body
