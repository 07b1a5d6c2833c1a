"""bprun's Optuna sweeper, found by Hydra's plugin discovery (hydra_plugins namespace)."""
