"""Site configs to copy and edit; packaged as autopipec_hpc.site_configs (see `autopipec-hpc site-template`)."""
