"""`task=eval`: rebuild the model from a checkpoint's own config and test it, clean and, with
`attack=fgsm|pgd`, under that adversarial attack (`test_<method>/*` beside `test/*`)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bprun.engine import checkpoint as ckpt_io
from bprun.engine.adversarial import attacked, describe
from bprun.engine.averaging import use_averaged_weights
from bprun.engine.precision import resolve_device
from bprun.engine.settings import TrainerSettings
from bprun.errors import BprunError
from bprun.io import write_json
from bprun.overrides import key_of
from bprun.tasks.setup import build_trainer, data_state, input_bounds

log = logging.getLogger("bprun")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    """Test the checkpoint `ckpt` (a run folder means its best weights); write eval.json."""
    if not cfg.get("ckpt"):
        raise BprunError("task=eval needs ckpt=<run folder or .pt file>")
    attack = OmegaConf.to_object(cfg.attack) if cfg.get("attack") else None
    path, state, saved = saved_run(cfg.ckpt)
    other_data = any(key_of(o).split(".")[0] == "dataset" for o in overrides)
    trained_on = saved.dataset.get("_target_")
    if other_data:
        # The saved model on another dataset: its shapes must fit (load_model_state says which not).
        log.info(
            f"evaluating the model trained on {saved.dataset.get('_target_')} on "
            f"{cfg.dataset.get('_target_')}, as the command line asks"
        )
        saved.dataset = cfg.dataset
    for key in ("problem", "metrics"):  # how to score it: the command line may say otherwise
        if any(key_of(o).split(".")[0] == key for o in overrides):
            saved[key] = cfg.get(key)
    if saved.model.get("init_from"):  # the checkpoint's weights replace them anyway
        saved.model.init_from = None
    s = saved_settings(saved, cfg.trainer.device)
    # The fitted encoding (table statistics, image normalisation) applies to the same source.
    fitted = data_state(state) if saved.dataset.get("_target_") == trained_on else None
    trainer, data = build_trainer(saved, None, s, data_state=fitted)
    try:
        ckpt_io.load_model_state(trainer.module, state["model"], path)
    except BprunError as e:
        if not other_data:
            raise
        raise BprunError(
            f"the model saved in {path} does not fit this dataset's input shape or classes "
            f"({str(e).split('(', 1)[-1].split(')')[0]}): evaluate it on data shaped like its own"
        ) from None
    weights = use_averaged_weights(trainer.module, state, data.train)
    if weights != "raw":
        log.info(f"evaluating the {weights.upper()} weights the checkpoint holds")
    problem = trainer.problem
    if getattr(problem, "auto_threshold", False):
        threshold = (state.get("best") or {}).get("val/best_threshold")
        if threshold is None:
            raise BprunError(
                f"problem.threshold=auto: {path} records no val/best_threshold (it was trained "
                "without a validation split): give problem.threshold=<a number in (0, 1)>"
            )
        problem.set_threshold(threshold)
    metrics = trainer.evaluate(data.test, "test")
    report = trainer.last_evaluation
    record = {"checkpoint": str(path), "weights": weights, "problem": problem.kind}
    if getattr(problem, "binary", False):
        record["threshold"] = problem.threshold
    if attack is not None and attack.method != "none":
        perturb = attacked(trainer, attack, input_bounds(data, trainer.device))
        metrics.update(trainer.evaluate(data.test, f"test_{attack.method}", perturb))
        record["attack"] = describe(attack)
    out = write_json({**record, **metrics}, path.parent / "eval.json")
    problem.report(report, path.parent, "test")
    for k, v in metrics.items():
        log.info(f"{k:<15} {v:.4f}")
    log.info(f"wrote {out}")
    return metrics.get("test/loss")


def saved_run(ckpt: str):
    """(checkpoint path, its state, the config it was trained with) of `ckpt`: a run folder
    means its best checkpoint (by the run's checkpoint monitor), else its last one."""
    path = ckpt_io.resolve_checkpoint(ckpt, "ckpt")
    state = ckpt_io.load_checkpoint(path)
    if Path(ckpt).is_dir() and state.get("topk") and state["topk"]["entries"]:
        best = path.parent / state["topk"]["entries"][0][1]
        if best.exists():  # a file, or a sharded checkpoint's folder
            path, state = best, ckpt_io.load_checkpoint(best)
    config = (state.get("extra") or {}).get("config")
    if not config:
        raise BprunError(f"{path} carries no config; it was not written by bprun train")
    return path, state, OmegaConf.create(config)


def saved_settings(saved: DictConfig, device: str) -> TrainerSettings:
    """The trainer settings of a saved run, to evaluate on `device` (no resume, no compile)."""
    s = TrainerSettings(
        **{
            k: v
            for k, v in OmegaConf.to_container(saved.trainer).items()
            if not isinstance(v, dict)
        }
    )
    s.device, s.resume, s.compile = device, None, False
    if s.precision == "16-mixed" and resolve_device(s.device).type != "cuda":
        s.precision = "32"  # float16 autocast needs CUDA; evaluate in full precision
    return s
