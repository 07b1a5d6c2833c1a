"""Hydra schemas: registered in the ConfigStore so compose validates keys and types."""

from hydra.core.config_store import ConfigStore

from bprun.engine.settings import TrainerSettings


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerSettings)
