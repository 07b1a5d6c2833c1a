"""bprun's submitit launchers (SLURM and local), found by Hydra's plugin discovery."""
