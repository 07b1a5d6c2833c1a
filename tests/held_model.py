"""bprun's MLP, held mid-training while a file exists: for tests that must act on a job
certain to be still training (a requeue, a kill), however fast the machine.

`model._target_=held_model.HeldMLP` with `tests/` on PYTHONPATH; while the file named by
BPRUN_TEST_HOLD exists, the 20th training forward of each process waits (at most two
minutes). A resumed job, started after the test removed the file, runs straight through.
"""

from __future__ import annotations

import os
import time

from bprun.models import MLP

HELD_AT = 20


class HeldMLP(MLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards = 0

    def forward(self, x):
        if self.training:
            self.forwards += 1
            hold = os.environ.get("BPRUN_TEST_HOLD")
            if hold and self.forwards == HELD_AT:
                deadline = time.monotonic() + 120
                while os.path.exists(hold) and time.monotonic() < deadline:
                    time.sleep(0.05)
        return super().forward(x)
