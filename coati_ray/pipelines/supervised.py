"""The driver for stages 1 and 2: SFT and reward-model training on a Ray trainer group.

    1. resolve the model and data (embedded defaults when none are given)
    2. start/join Ray and the trainer group; each rank loads and tokenizes its data
    3. resume from the latest checkpoint if asked
    4. loop: train_step -> log -> (evaluate) -> (checkpoint)
    5. final evaluation; save the HF model to --save_path

`--save_path` is the HF model directory; `checkpoints/step_N/` and `tensorboard/` live inside it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coati_ray.cluster.group import TrainerGroup
from coati_ray.cluster.ray_env import init_ray
from coati_ray.config import (
    ClusterArgs,
    FileDataArgs,
    ModelArgs,
    PairDataArgs,
    PreferenceArgs,
    PreferenceDataArgs,
    RMArgs,
    SFTDataArgs,
    TrainArgs,
    validate_all,
)
from coati_ray.defaults import demo_file
from coati_ray.errors import ConfigError
from coati_ray.models.loading import check_family, load_config, resolve_model_path
from coati_ray.run_dir import check_resume_config, prune_checkpoints, resume_checkpoint, start_run
from coati_ray.tracking import Trackers, parse_report_to
from coati_ray.workers.trainer import SetupInfo, TrainJob

logger = logging.getLogger(__name__)

DEMO_FILES = {"sft": ("sft_train.json", "sft_eval.jsonl"), "rm": ("rm_train.jsonl", "rm_eval.jsonl"),
              "dpo": ("rm_train.jsonl", "rm_eval.jsonl")}
DATA_ARGS: dict[str, type[FileDataArgs]] = {"sft": SFTDataArgs, "rm": PairDataArgs,  # what each stage reads
                                            "dpo": PreferenceDataArgs}


@dataclass
class TrainResult:
    save_path: str
    setup: SetupInfo
    history: list[dict[str, float]] = field(default_factory=list)  # train metrics of every step
    evals: list[dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    run_id: str = ""  # the id in save_path/run.json that this run's checkpoints carry

    @property
    def final_eval(self) -> dict[str, float]:
        return self.evals[-1] if self.evals else {}


def make_job(stage: str, model: ModelArgs, data: FileDataArgs, train: TrainArgs, rm: RMArgs | None,
             pref: PreferenceArgs | None = None) -> TrainJob:
    if not isinstance(data, DATA_ARGS[stage]):  # the other stage's columns would be silently ignored
        raise TypeError(f"stage {stage!r} reads {DATA_ARGS[stage].__name__}, got {type(data).__name__}")
    model_path = resolve_model_path(model.pretrain, model.model, model.preset_size)
    # Fail here, before any actor starts, if the model is unreadable or of the wrong family.
    check_family(load_config(model_path), model.model, model_path)
    if data.dataset:
        train_file, eval_file = data.dataset, data.eval_dataset
    elif stage == "dpo" and pref is not None and pref.loss == "kto":
        raise ConfigError("dataset", "--loss kto reads unpaired rows (prompt, completion, label); give them with "
                          "--dataset (e.g. the chat page's feedback: scripts/export_feedback.py --kto FILE)")
    else:
        train_file, eval_file = demo_file(DEMO_FILES[stage][0]), data.eval_dataset or demo_file(DEMO_FILES[stage][1])
    from coati_ray.data.hub import check_source

    check_source(train_file, "dataset", data)  # a Hub id or dataset repository is loaded here, before the actors
    check_source(eval_file, "eval_dataset", data)
    return TrainJob(stage, model_path, train_file, eval_file, model, data, train, rm, pref=pref)


def run_training(stage: str, model: ModelArgs, data: FileDataArgs, train: TrainArgs, cluster: ClusterArgs,
                 rm: RMArgs | None = None, local: bool = False, progress: bool = True,
                 pref: PreferenceArgs | None = None) -> TrainResult:
    """Train stage `stage` ("sft" with `SFTDataArgs`, "rm" with `PairDataArgs`, "dpo" with
    `PreferenceDataArgs` and `pref`) and save the model to `train.save_path`."""
    validate_all(model, data, train, cluster, *([pref] if pref is not None else []))
    if stage == "dpo" and pref is None:
        pref = PreferenceArgs()
    if local and cluster.trainers != 1:
        raise ConfigError("local", f"runs the single trainer in this process; got --trainers {cluster.trainers}")
    job = make_job(stage, model, data, train, rm, pref)
    config = {"model": asdict(model), "data": asdict(job.data), "train": asdict(train), "cluster": asdict(cluster)}
    for name, part in (("rm", job.rm), ("preference", job.pref)):
        if part is not None:
            config[name] = asdict(part)
    check_resume_config(train.save_path, train.resume, config)
    cpus = cluster.trainer_cpus()
    if not local:
        init_ray(cluster.address, num_cpus=int(cluster.trainers * cpus), dashboard_host=cluster.dashboard_host,
                 dashboard=cluster.dashboard)
    group = TrainerGroup(cluster.trainers, cpus, cluster.gpus_per_trainer, local=local)
    try:
        return _loop(stage, group, job, train, progress, config)
    finally:
        group.shutdown()


def _loop(stage: str, group: TrainerGroup, job: TrainJob, ta: TrainArgs, progress: bool,
          config: dict) -> TrainResult:
    from tqdm import tqdm

    info = group.setup(job)
    if info.reference_seconds:
        logger.info("reference log-probs of %d rows computed in %.1f s (once, from the starting model)",
                    info.n_train + info.n_eval, info.reference_seconds)
    logger.info("%s: %d train / %d eval samples, global batch %d, %d steps/epoch, %d steps, %.2fM params "
                "(%.2fM trainable), lr %.1e (%s)", stage, info.n_train, info.n_eval, info.global_batch,
                info.steps_per_epoch, info.total_steps, info.params / 1e6, info.trainable_params / 1e6, info.lr,
                info.lr_why)
    if info.padding:
        logger.info("%s micro-batches (rank 0, one epoch): %s", stage, info.padding)
    result = TrainResult(ta.save_path, info)
    save = Path(ta.save_path)
    run_id = start_run(ta.save_path, stage, ta.resume, ta.overwrite, config)
    result.run_id = run_id

    def checkpoint(step: int) -> None:
        group.save_checkpoint(str(save / "checkpoints" / f"step_{step}"),
                              {"epoch": step // max(info.steps_per_epoch, 1), "run_id": run_id})
        prune_checkpoints(ta.save_path, ta.keep_checkpoints, "trainer_state.json")

    if ta.resume != "no":
        ckpt = resume_checkpoint(ta.resume, ta.save_path)
        if ckpt is None:
            logger.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", ta.save_path)
        else:
            meta = group.load_checkpoint(ckpt)
            result.start_step = meta["step"]
            logger.info("resumed from %s at step %d", ckpt, result.start_step)
            if meta.get("world_size", group.n) != group.n:
                logger.warning("resumed with %d trainers from a checkpoint of %d: the weights and optimizer state "
                               "are the saved ones, but the global batch and the data order from here differ from "
                               "an uninterrupted run", group.n, meta["world_size"])
    writer = Trackers(parse_report_to(ta.report_to), ta.save_path, stage, run_id, config)
    # Redraw often on a terminal, rarely into a log file.
    bar = tqdm(total=info.total_steps, initial=result.start_step, desc=stage, disable=not progress,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    step = result.start_step
    try:
        while step < info.total_steps:
            m = group.train_step()
            step = int(m["train/step"])
            result.history.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['train/loss']:.4f}", refresh=False)  # redraw at mininterval only
            writer.scalars(m, step)
            if step % ta.log_interval == 0 or step == info.total_steps:
                bar.write(_metrics_line(step, info.total_steps, m))
            if ta.eval_interval and step % ta.eval_interval == 0 and step < info.total_steps:
                _evaluate(group, result, writer, step, bar)
            if ta.ckpt_interval and step % ta.ckpt_interval == 0 and step < info.total_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        # Keep what was done: a checkpoint at the last finished step, then stop.
        logger.warning("interrupted at step %d; saving a checkpoint so --resume can continue", step)
        checkpoint(step)
        writer.close()
        raise
    finally:
        bar.close()
    try:
        _evaluate(group, result, writer, step, None)
    finally:
        writer.close()
    checkpoint(step)
    group.save_model(ta.save_path, job.model.merge_lora)
    (save / "train_summary.json").write_text(json.dumps({
        "stage": stage, "steps": step, "run_id": run_id, "final_eval": result.final_eval,
        "final_train_loss": result.history[-1]["train/loss"] if result.history else None,
        "setup": {k: v for k, v in asdict(info).items() if k != "skipped_rows"},
        "skipped_rows": len(info.skipped_rows)}, indent=1))
    if info.skipped_rows:
        logger.warning("skipped %d bad rows (--skip_bad_rows); first: %s", len(info.skipped_rows), info.skipped_rows[0])
    logger.info("saved %s model to %s", stage, ta.save_path)
    return result


def _evaluate(group: TrainerGroup, result: TrainResult, writer: Trackers, step: int, bar) -> None:
    if result.setup.n_eval == 0:  # --eval_split 0 and no --eval_dataset
        return
    ev = group.evaluate()
    ev["train/step"] = step
    result.evals.append(ev)
    writer.scalars({k: v for k, v in ev.items() if k != "train/step"}, step)
    line = f"eval @ step {step}: " + "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in ev.items()
                                              if k != "train/step")
    (bar.write if bar else logger.info)(line)


def _metrics_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}",
             f"grad_norm {m['train/grad_norm']:.3f}", f"tok/s {m['perf/tokens_per_s']:.0f}"]
    if "train/acc" in m:
        parts.append(f"acc {m['train/acc']:.3f}")
    for k in ("margin", "accuracy"):
        if f"train/rewards/{k}" in m:
            parts.append(f"reward {k} {m[f'train/rewards/{k}']:.3f}")
    return " | ".join(parts)
