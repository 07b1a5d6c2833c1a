"""Hyperparameter search on Optuna: `bprun -m search=<name>`.

The sweeper plugin (hydra_plugins/bprun_optuna_sweeper) asks Optuna for one
trial at a time as a slot frees up and launches it as a Hydra job with
`search.trial=<number>`; the job reports its monitored metric every epoch to
that trial through the study's storage and stops when the pruner says so.

    settings.py  the typed `search` node
    space.py     Hydra's override grammar -> Optuna distributions, checked up front
    study.py     storage, sampler, pruner, the study; resume and the trial cap
    pruning.py   the job side: a Trainer callback that reports and prunes
    workers.py   long-lived worker processes that run trial after trial (search.workers)
    compose.py   a worker's trial configs, from one composed config per set of group choices
    report.py    the trials table, the best command, parameter importances
"""
