"""Where a run's results go: the run folder, and the experiment trackers picked with `tracker=`.

    trackers.py        the interface the Trainer and callbacks write to (log, text,
                       histogram, finish), the trackers of `tracker=[...]`, their checks
    background.py      a worker thread with a bounded buffer that retries a failing tracker
    tensorboard.py     event files: scalars, lr per group, text, histograms, HPARAMS
    mlflow_tracker.py  MLflow runs; a sweep's parent run
    wandb_tracker.py   Weights & Biases, offline by default
    csv_tracker.py     metrics.csv
    callbacks.py       TensorBoard extras as Trainer callbacks (histograms, graph, lr groups)
    console.py         the result table printed at the end of a run

metrics.json and the other JSON files are written with `bprun.io.write_json`.
The modules import their libraries (TensorBoard, MLflow, W&B), so nothing is imported here.
"""
