"""One GPU per parallel sweep job, checked through CUDA_VISIBLE_DEVICES (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
from conftest import BPRUN, job_dir

from bprun.sweep import gpus


def test_claims_are_exclusive_and_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpus.visible_gpus() == ["3", "5"]
    first = gpus.claim(tmp_path, ["3", "5"])
    second = gpus.claim(tmp_path, ["3", "5"])
    assert {first.gpu, second.gpu} == {"3", "5"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == second.gpu
    got = []
    waiting = threading.Thread(target=lambda: got.append(gpus.claim(tmp_path, ["3", "5"], 0.01)))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not got  # both GPUs taken: the third job waits
    first.release()
    waiting.join(5)
    assert got and got[0].gpu == first.gpu
    second.release()
    got[0].release()


def test_hidden_gpus_mean_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpus.visible_gpus() == []


@pytest.mark.slow
def test_parallel_sweep_gives_each_job_its_own_gpu(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            BPRUN,
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            f"paths.data_dir={data_dir}",
            "dataset=digits",
            "model.hidden=[16]",
            "trainer.device=cpu",
            "trainer.max_epochs=2",
            "trainer.progress=false",
            "seed=0,1,2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "7,9"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = [json.loads((job_dir(sweep, i) / "job.json").read_text()) for i in range(3)]
    assert all(job["gpu"] in ("7", "9") for job in jobs)
    for i, a in enumerate(jobs):
        log = (job_dir(sweep, i) / "bprun.log").read_text()
        assert f"GPU {a['gpu']} (CUDA_VISIBLE_DEVICES={a['gpu']})" in log
        for b in jobs[i + 1 :]:
            if a["started"] < b["ended"] and b["started"] < a["ended"]:  # side by side
                assert a["gpu"] != b["gpu"]
