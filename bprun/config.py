"""Hydra schemas: registered in the ConfigStore so compose validates keys and types."""

from hydra.core.config_store import ConfigStore

from bprun.diagnostics.settings import GradcheckSettings, LrFindSettings
from bprun.engine.settings import TrainerSettings


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerSettings)
    cs.store(group="gradcheck", name="gradcheck_schema", node=GradcheckSettings)
    cs.store(group="lr_find", name="lr_find_schema", node=LrFindSettings)
