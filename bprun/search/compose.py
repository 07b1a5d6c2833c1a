"""A trial's config without composing it from scratch.

Hydra composes every job's config anew: it reads the defaults list, every group's
file and every schema again, which costs most of a second per trial of a small
model. A trial differs from the next in a few values, and in a few group
choices at most (`optim=adam,adamw`). A worker composes once per distinct set
of group choices, keeps that config, and applies each trial's value overrides
to a copy, with Hydra's own code for applying overrides, so a wrong type or an
unknown key fails as it would in Hydra. What Hydra records of the overrides
(`hydra.overrides.task`, `hydra.job.override_dirname`) is set as it would have
set it.
"""

from __future__ import annotations

import copy

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict


class TrialComposer:
    def __init__(self, loader, master: DictConfig):
        self.loader, self.master = loader, master
        self.parser = OverridesParser.create()
        # Per set of group choices: a composed config, and the value keys already set in it.
        self.bases: dict[tuple[str, ...], tuple[DictConfig, frozenset]] = {}
        self.groups: set[str] | None = None  # known once one config was composed

    def compose(self, overrides: list[str]) -> DictConfig:
        hydra_overrides = list(OmegaConf.to_container(self.master.hydra.overrides.hydra))
        parsed = self.parser.parse_overrides([*hydra_overrides, *overrides])
        if self.groups is None:  # the first trial: learn the config's groups from it
            cfg = self.loader.load_sweep_config(self.master, list(overrides))
            self.groups = set(cfg.hydra.runtime.choices)
            # ... and keep it as the base of its group choices, its values in: a later trial
            # that sets every one of those keys (a search's trials set the same ones) replaces
            # them all, and spares a composition.
            baked = frozenset(o.key_or_group for o in parsed if self._is_value(o))
            self.bases[self._key(parsed, hydra_overrides)] = (copy.deepcopy(cfg), baked)
            return cfg
        values = [o for o in parsed if self._is_value(o)]
        key = self._key(parsed, hydra_overrides)
        if key not in self.bases or not self.bases[key][1] <= {o.key_or_group for o in values}:
            self.bases[key] = (self.loader.load_sweep_config(self.master, list(key)), frozenset())
            self.groups |= set(self.bases[key][0].hydra.runtime.choices)
        cfg = copy.deepcopy(self.bases[key][0])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        app = [o for o in parsed if not o.is_hydra_override()]
        job = cfg.hydra.job
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in app]
            job.override_dirname = get_overrides_dirname(
                overrides=app,
                kv_sep=job.config.override_dirname.kv_sep,
                item_sep=job.config.override_dirname.item_sep,
                exclude_keys=job.config.override_dirname.exclude_keys,
            )
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg

    def _key(self, parsed: list, hydra_overrides: list) -> tuple[str, ...]:
        """The trial's overrides that are not plain values: its group choices and the like."""
        return tuple(o.input_line for o in parsed[len(hydra_overrides) :] if not self._is_value(o))

    def _is_value(self, o) -> bool:
        """A plain `key=value` of a config value (not a group, not Hydra's, not +/~/++)."""
        if o.is_hydra_override() or o.package is not None or o.is_sweep_override():
            return False
        if o.is_add() or o.is_delete() or o.is_force_add():
            return False
        return o.key_or_group not in self.groups
