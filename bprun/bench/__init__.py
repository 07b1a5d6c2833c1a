"""Benchmarks against hand-written PyTorch, reported as ratios measured in one run.

    python -m bprun.bench               engine vs. a plain training loop (loop.py)
    python -m bprun.bench --ddp         N ranks (trainer.devices=N) vs. one process (ddp.py)
    python -m bprun.bench --data        streaming vs. a hand-written DataLoader loop (data.py)
    python -m bprun.bench.instruments   the gradient instruments' cost per update
    python -m bprun.bench.sweep         a 4-job sweep, sequential vs. parallel jobs

Not timed tests: each prints a table for the README.
"""
