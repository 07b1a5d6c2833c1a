"""A light start: a training run imports nothing heavy that its config does not use."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torchvision", "torch._dynamo", "matplotlib", "sklearn", "scipy")


def imported_after(code: str) -> set[str]:
    probe = f"{code}; import sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_train_task_and_the_default_model_load_no_heavy_module():
    code = (
        "import bprun.cli, bprun.tasks.train; from hydra.utils import get_class; "
        "get_class('bprun.models.MLP'); get_class('bprun.models.CNN')"
    )
    loaded = imported_after(code)
    assert "torch" in loaded and "bprun.tasks.train" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_the_command_line_alone_loads_no_torch():
    assert "torch" not in imported_after("import bprun.cli")


def test_resnet_still_resolves_by_its_config_path():
    loaded = imported_after(
        "from hydra.utils import get_method; get_method('bprun.models.resnet.resnet')"
    )
    assert "torchvision" in loaded
