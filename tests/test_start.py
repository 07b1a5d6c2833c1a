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


def test_the_metrics_load_without_scipy_signal_which_still_imports_after():
    code = (
        "from bprun.problems._torchmetrics import load; tm = load(); "
        "import sys; signal_then = 'scipy.signal' in sys.modules; "
        "import scipy.signal; print(signal_then, len(scipy.signal.windows.hamming(4)), "
        "int(tm.classification.MulticlassAccuracy(num_classes=2)"
        "(__import__('torch').tensor([0, 1]), __import__('torch').tensor([0, 1]))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "4", "1"]  # not loaded by torchmetrics; real after


def test_a_run_composes_its_config_twice_not_three_times(tmp_path):
    """The command-line check's composition, then Hydra's for the run; Hydra's own extra one,
    only to read hydra.mode, is answered from the check's (0.4 s of every command)."""
    code = (
        "import sys\n"
        "from hydra._internal.hydra import Hydra\n"
        "real = Hydra.compose_config\n"
        "def counted(self, *a, **k):\n"
        "    print('COMPOSED', file=sys.stderr, flush=True)\n"
        "    return real(self, *a, **k)\n"
        "Hydra.compose_config = counted\n"
        "from bprun.cli import main\n"
        "sys.argv = ['bprun', 'dataset=digits', 'model=logreg', 'trainer.fast_dev_run=true',\n"
        f"            'trainer.threads=1', 'hydra.run.dir={tmp_path / 'run'}']\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").exists()
    assert out.stderr.count("COMPOSED") == 2
