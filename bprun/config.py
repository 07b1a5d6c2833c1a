"""Hydra schemas and plugins: registered before compose, so it validates keys and types."""

from hydra.core.config_store import ConfigStore

from bprun.diagnostics.settings import GradcheckSettings, LrFindSettings
from bprun.engine.settings import TrainerSettings


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerSettings)
    cs.store(group="gradcheck", name="gradcheck_schema", node=GradcheckSettings)
    cs.store(group="lr_find", name="lr_find_schema", node=LrFindSettings)
    register_plugins()


def register_plugins() -> None:
    """Register bprun's Hydra plugins (their import stores their configs).

    An installed wheel puts them where Hydra's discovery lists the `hydra_plugins`
    namespace; an editable install maps that namespace through an import hook,
    which imports but cannot be listed, so discovery alone would miss them there.
    Registering a plugin that discovery found already changes nothing.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.bprun_sweeper.sweeper import BprunSweeper

    Plugins.instance().register(BprunSweeper)
