"""Jinja2 templates of the job files (pacemaker input.yaml, SLURM preamble); packaged as autopipec_hpc.job_templates."""
