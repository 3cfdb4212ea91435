"""autopipec-hpc: DFT data to a validated ACE potential."""
