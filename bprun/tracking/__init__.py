"""Where a run's results go, all inside its run folder.

    tensorboard.py   event files: scalars, lr per group, text, histograms, HPARAMS
    callbacks.py     TensorBoard extras as Trainer callbacks (histograms, graph, lr groups)
    console.py       the result table printed at the end of a run

metrics.json and the other JSON files are written with `bprun.io.write_json`.
The modules import TensorBoard, so nothing is imported here.
"""
