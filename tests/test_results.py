"""The accuracies README.md quotes, one seed each, within a margin.

The shipped-settings table (seed 0, 2 CPU cores) and the MNIST-1D paper table
(mean of seeds 0-2; here seed 0). The GRU row (2-3 minutes per seed) stays a
documented command: `bprun -m +experiment=mnist1d_paper_gru seed=0,1,2`.
"""

from __future__ import annotations

import pytest

# (command line, README's test accuracy, allowed distance)
RESULTS = {
    "bprun": ((), 0.590, 0.02),
    "bprun dataset=digits": (("dataset=digits",), 0.975, 0.015),
    "paper logistic regression": (("+experiment=mnist1d_paper_logreg",), 0.320, 0.03),
    "paper MLP": (("+experiment=mnist1d_paper_mlp",), 0.656, 0.03),
    "paper CNN": (("+experiment=mnist1d_paper_cnn",), 0.925, 0.03),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESULTS))
def test_readme_accuracy(name, bprun):
    args, quoted, margin = RESULTS[name]
    m = bprun(*args, "seed=0").metrics
    assert m["status"] == "completed"
    assert abs(m["test"]["test/acc"] - quoted) <= margin, (name, m["test"]["test/acc"], quoted)
