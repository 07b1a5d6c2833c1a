"""The search space, written in Hydra's override grammar, as Optuna distributions.

    optim.lr: tag(log, interval(1e-4, 1e-1))     float, log-uniform
    optim.weight_decay: interval(0, 1e-3)        float, uniform
    model.width: int(interval(32, 512))          int, uniform (tag(log, ...) for log)
    dataset.batch_size: range(32, 257, 32)       int, step 32 (end excluded, as in Python)
    model.dropout: choice(0.0, 0.1, 0.3)         categorical
    model: mlp,cnn                               categorical (a config group)
    trainer.max_epochs: 10                       fixed for every trial

Every mistake is found here, before any trial runs, as one line: an empty
choice or range, low > high, a log scale over a non-positive bound, a sampler
that cannot use the space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bprun.errors import BprunError


@dataclass
class Space:
    distributions: dict[str, Any] = field(default_factory=dict)  # name -> optuna distribution
    keys: dict[str, str] = field(default_factory=dict)  # name -> the override's key (+a, b@c)
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's parameters as command-line overrides."""
        return [*self.fixed, *(f"{self.keys[n]}={_literal(v)}" for n, v in params.items())]

    def grid(self) -> dict[str, list]:
        """sampler=grid: every parameter's values; intervals have none."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        grid = {}
        for name, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                grid[name] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                grid[name] = list(range(d.low, d.high + 1, d.step))
            else:
                raise BprunError(
                    f"search.sampler=grid needs a list of values for {name}: write it as "
                    "choice(...) or range(...), not interval(...)"
                )
        return grid

    def size(self) -> int | None:
        """Number of points of an all-discrete space; None when any parameter is continuous."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        n = 1
        for d in self.distributions.values():
            if isinstance(d, CategoricalDistribution):
                n *= len(d.choices)
            elif isinstance(d, IntDistribution):
                n *= (d.high - d.low) // d.step + 1
            else:
                return None
        return n


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)  # categoricals are kept in Hydra's own encoding


def parse_space(params: dict[str, str], arguments: list[str]) -> Space:
    """`hydra.sweeper.params` plus the command line's overrides -> a Space.

    Sweep overrides (`interval`, `range`, `choice`, `a,b`) become distributions;
    plain `key=value` ones are the same for every trial. The command line wins
    over the config for a key given in both.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    by_key, line_of = {}, {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException as e:
            message = str(e).splitlines()[0]
            raise BprunError(f"search space: {line}: {message}") from None
        by_key[override.key_or_group] = override
        line_of[override.key_or_group] = line
    space = Space()
    for name, override in by_key.items():
        if override.is_sweep_override():
            space.distributions[name] = _distribution(name, override)
            space.keys[name] = override.get_key_element()
        else:
            space.fixed.append(line_of[name])
    if not space.distributions:
        raise BprunError(
            "the search has no space: give hydra.sweeper.params (a conf/search/<name>.yaml) or "
            "sweep overrides such as 'optim.lr=tag(log,interval(1e-4,1e-1))'"
        )
    return space


def _distribution(name: str, override) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log = "log" in (value.tags or set())
    if isinstance(value, ChoiceSweep):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise BprunError(f"search space: {name} is an empty choice: give it values")
        if len(set(choices)) != len(choices):
            raise BprunError(
                f"search space: {name} lists a value twice: {', '.join(map(str, choices))}"
            )
        if log:
            raise BprunError(f"search space: {name}: tag(log, ...) applies to interval and range")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise BprunError(f"search space: {name}: shuffle(range(...)) has no meaning here")
        values = list(override.sweep_iterator())
        if not values:
            raise BprunError(
                f"search space: {name}=range({value.start}, {value.stop}, {value.step}) is "
                "empty: the end is excluded and must lie past the start in the step's direction"
            )
        low, high = min(values), max(values)
        if all(isinstance(v, int) for v in values):
            _check_log(name, log, low)
            step = abs(int(value.step))
            if log and step != 1:
                raise BprunError(f"search space: {name}: a log scale needs step 1 in range(...)")
            return IntDistribution(low, high, step=1 if log else step, log=log)
        # Float ranges: their values exactly, not a stepped float distribution
        # whose rounding would drift from what range(...) lists.
        return CategoricalDistribution([Transformer.encode(v) for v in values])
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low > high:
            raise BprunError(
                f"search space: {name}=interval({low}, {high}) has low > high: swap the bounds"
            )
        _check_log(name, log, low)
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise BprunError(
        f"search space: {name}={override.get_value_element_as_str()} is not a space: "
        "use interval(...), range(...) or choice(...)"
    )


def _check_log(name: str, log: bool, low) -> None:
    if log and low <= 0:
        raise BprunError(
            f"search space: {name} has a log scale from {low}: a log scale needs bounds above 0"
        )
