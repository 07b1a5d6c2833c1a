"""Meta-learning: learning an initialisation that adapts to a new task in a few gradient steps.

    maml.py      the algorithm (MAML and first-order MAML), on weights held in a dict
    sine.py      the sinusoid regression tasks of Finn et al. (2017)
    trainer.py   the meta-training loop: checkpoints, signals, exact resume, the baseline
    settings.py  the `meta` config node's schema

A distribution of tasks of one's own is any `_target_` whose object has `task`,
`input_shape`, `num_classes` (as a dataset's) and `sample(n_tasks, shots, query, generator)`
returning a `bprun.meta.sine.TaskBatch`.
"""
