"""Sweeps: the Hydra callback that records every job and the summary it writes.

    callback.py   SweepCallback (hydra.callbacks.sweep in conf/config.yaml): job.json,
                  one line per job, threads per parallel job, summary at the end
    summary.py    summary.csv / summary.md read back from the job folders

The sweeper that makes the jobs is a Hydra plugin: hydra_plugins/bprun_sweeper.
"""
