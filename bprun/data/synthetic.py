"""Generated regression tasks: tabular nonlinear regression and time-series forecasting.

Both are fixed by their seed, need no files, and take well under a second to
make, so they are generated on every run rather than cached.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bprun.data.sources import Dataset
from bprun.errors import BprunError


def load_regression(
    num_samples: int = 5000,
    num_features: int = 10,
    noise: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Friedman #1: y = 10 sin(pi x0 x1) + 20 (x2 - 1/2)^2 + 10 x3 + 5 x4 + noise, x ~ U[0, 1]^d.

    Only the first five of the `num_features` inputs matter; the rest are
    distractors. `noise` is the standard deviation of the Gaussian noise in y's
    own units (y itself spans about 0..30). Targets are standardised with the
    training split's mean and std, so an MSE of 1 is what predicting the mean
    scores. Inputs are (N, d) float, targets (N, 1).
    """
    from sklearn.datasets import make_friedman1

    if num_features < 5:
        raise BprunError(f"dataset.num_features must be at least 5, got {num_features}")
    if num_samples < 10:
        raise BprunError(f"dataset.num_samples must be at least 10, got {num_samples}")
    x, y = make_friedman1(num_samples, n_features=num_features, noise=noise, random_state=seed)
    n_test = _count_test(num_samples, test_fraction)
    n_train = num_samples - n_test
    y = (y - y[:n_train].mean()) / y[:n_train].std()
    x = torch.from_numpy(x.astype(np.float32))
    y = torch.from_numpy(y.astype(np.float32)).unsqueeze(1)
    return Dataset(
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        num_classes=1,
        problem="regression",
    )


def load_timeseries(
    signal: str = "mackey_glass",
    length: int = 6000,
    window: int = 64,
    horizon: int = 8,
    noise: float = 0.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Forecast the next `horizon` values of a generated series from the `window` before them.

    Inputs are (N, 1, window) windows (channels first, like MNIST-1D), targets
    (N, horizon). The split is chronological: the series is cut at
    1 - test_fraction of its length, training windows lie wholly before the cut
    and every test target after it, so no test value is ever trained on. The
    series is standardised with the mean and std of the part before the cut.
    Validation (dataset.val_fraction) is taken the same way from the end of the
    training windows.
    """
    if window < 1 or horizon < 1:
        raise BprunError(
            f"dataset.window and dataset.horizon must be at least 1, got {window}, {horizon}"
        )
    rng = np.random.default_rng(seed)
    if signal == "mackey_glass":
        series = mackey_glass(length, rng)
    elif signal == "sines":
        series = noisy_sines(length, rng)
    else:
        raise BprunError(f"dataset.signal='{signal}' is not known: use mackey_glass or sines")
    if noise > 0:
        series = series + noise * series.std() * rng.standard_normal(length)
    cut = length - _count_test(length, test_fraction)
    span = window + horizon
    if cut < span or length - cut < horizon:
        raise BprunError(
            f"dataset.length={length} is too short for window {window} + horizon {horizon} "
            f"with test_fraction {test_fraction}: raise dataset.length"
        )
    series = (series - series[:cut].mean()) / series[:cut].std()
    s = torch.from_numpy(series.astype(np.float32))
    windows = s.unfold(0, span, 1)  # (length - span + 1, span): every window, a view
    train = windows[: cut - span + 1]  # the last one ends at cut - 1
    test = windows[cut - window :]  # the first one's targets start at cut
    return Dataset(
        x_train=train[:, :window].unsqueeze(1).contiguous(),
        y_train=train[:, window:].contiguous(),
        x_test=test[:, :window].unsqueeze(1).contiguous(),
        y_test=test[:, window:].contiguous(),
        num_classes=horizon,
        problem="regression",
        split_gap=horizon - 1,
    )


def mackey_glass(
    length: int,
    rng: np.random.Generator,
    tau: float = 17.0,
    beta: float = 0.2,
    gamma: float = 0.1,
    n: float = 10.0,
    dt: float = 0.1,
    warmup: int = 500,
) -> np.ndarray:
    """The chaotic Mackey-Glass delay equation (tau=17), Euler steps of `dt`, one sample per unit.

    dx/dt = beta x(t - tau) / (1 + x(t - tau)^n) - gamma x(t). The first
    `warmup` time units (the transient from a random constant history) are
    dropped.
    """
    per_unit = round(1 / dt)
    delay = round(tau / dt)
    x = [0.9 + 0.6 * float(rng.random())] * delay  # the constant history before t = 0
    for _ in range((length + warmup) * per_unit):  # plain floats: 10x faster than numpy scalars
        past, prev = x[-delay], x[-1]
        x.append(prev + dt * (beta * past / (1.0 + past**n) - gamma * prev))
    return np.asarray(x[delay + warmup * per_unit :: per_unit][:length])


def noisy_sines(length: int, rng: np.random.Generator, waves: int = 4) -> np.ndarray:
    """A sum of `waves` sines with random periods (8 to 120 samples), amplitudes and phases."""
    t = np.arange(length)[:, None]
    periods = rng.uniform(8, 120, waves)
    amplitudes = rng.uniform(0.3, 1.0, waves)
    phases = rng.uniform(0, 2 * math.pi, waves)
    clean = (amplitudes * np.sin(2 * math.pi * t / periods + phases)).sum(1)
    return clean + 0.05 * rng.standard_normal(length)


def _count_test(n: int, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise BprunError(f"dataset.test_fraction must be in (0, 1), got {fraction}")
    return max(1, int(round(n * fraction)))
