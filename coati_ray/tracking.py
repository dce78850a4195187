"""Experiment trackers (`--report_to tensorboard,wandb,mlflow`): where a run's settings, its metrics
and tables of sample generations go.

Every tracker gets, from the driver only: the run's configuration once (as hyper-parameters), every
step's metrics (the keys the console line and `coati report` use: `reward/mean`, `train/loss`, ...),
and for PPO every `--log_samples_interval` steps a table of sample generations (step, prompt,
response, reward). A resumed run continues the same tracker run (its `run.json` id names it).

- tensorboard: event files in `save_path/tensorboard` (scalars, the configuration as TensorBoard
  hparams and as text, samples as a text table), written with tensorboard's own writer and protos,
  so the driver never imports torch (coati_ray/workers/shells.py says why that matters).
- wandb: `wandb.init(project=$WANDB_PROJECT or "coati_ray", id=run_id, dir=save_path)`; set
  `WANDB_MODE=offline` to keep it local (`wandb sync` uploads later).
- mlflow: `$MLFLOW_TRACKING_URI` when set, else a SQLite store `save_path/mlflow.db` with artifacts in
  `save_path/mlartifacts` (MLflow 3 keeps its plain-file store in maintenance mode and refuses it by
  default); experiment `$MLFLOW_EXPERIMENT_NAME` or "coati_ray"; the run is tagged `coati.run_id`.
wandb and mlflow are optional (`pip install 'coati_ray[track]'`), imported only when named.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from coati_ray.errors import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
SAMPLE_COLUMNS = ("step", "prompt", "response", "reward")


def parse_report_to(value: str) -> list[str]:
    """`--report_to` as a list of tracker names ("none": no tracker); a missing package is an error
    here, before anything starts."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad or not names:
        raise ConfigError("report_to", f"unknown tracker {bad[0] if bad else value!r}; expected a comma-separated "
                          f"list of {', '.join(TRACKERS)}, or none")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError("report_to", f"{name} is not installed: pip install 'coati_ray[track]' (or {name})")
    return list(dict.fromkeys(names))


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"run": {"lr": 1e-5}} -> {"run.lr": 1e-5}; values trackers cannot hold (None, lists) become text."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return out


class ScalarWriter:
    """TensorBoard event files: scalars, text and hparams summaries."""

    def __init__(self, logdir: str | Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(logdir))

    def _add(self, summary, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._writer.add_event(Event(summary=summary, step=int(step), wall_time=time.time()))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._add(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._add(text_pb(tag, text), step)

    def add_hparams(self, hparams: dict[str, bool | int | float | str]) -> None:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        self._add(hparams_pb(hparams), 0)

    def close(self) -> None:
        self._writer.close()


def _markdown_table(rows: list[dict]) -> str:
    def cell(v: Any) -> str:
        s = f"{v:.4f}" if isinstance(v, float) else str(v)
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in SAMPLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


class Trackers:
    """The run's trackers, opened once at its start (after `start_run` gave it its id)."""

    def __init__(self, names: list[str], save_path: str, stage: str, run_id: str, config: dict[str, Any]):
        self.names, self.save, hp = names, Path(save_path).resolve(), flat_hparams(config)
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            self._tb = ScalarWriter(self.save / "tensorboard")
            self._tb.add_hparams(hp)
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "coati_ray"), id=run_id,
                                     name=f"{stage}-{self.save.name}", job_type=stage, dir=str(self.save),
                                     config=hp, resume="allow", reinit="create_new",
                                     settings=wandb.Settings(silent=True))  # our lines say where the run is
        if "mlflow" in names:
            self._mlflow = self._start_mlflow(stage, run_id, hp)
        logger.info("metrics: %s", ", ".join(self.where()) or "no tracker (--report_to none)")

    def _start_mlflow(self, stage: str, run_id: str, hp: dict):
        import mlflow

        for name in ("mlflow", "alembic"):  # their INFO lines about creating tables are not ours to show
            logging.getLogger(name).setLevel(logging.WARNING)
        client = mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.save / 'mlflow.db'}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "coati_ray")
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else
            (self.save / "mlartifacts").as_uri())
        found = client.search_runs([exp_id], f"tags.`coati.run_id` = '{run_id}'", max_results=1)
        if found:  # a resumed run goes on in its MLflow run
            run = found[0]
        else:
            run = client.create_run(exp_id, run_name=f"{stage}-{self.save.name}",
                                    tags={"coati.run_id": run_id, "coati.stage": stage})
            items = list(hp.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000])
                                                          for k, v in items[i:i + 100]])
        self.mlflow_run_id = run.info.run_id
        return client

    def where(self) -> list[str]:
        out = [f"tensorboard ({self.save / 'tensorboard'})"] if self._tb else []
        if self._wandb is not None:
            out.append(f"wandb ({self._wandb.settings.mode} run {self._wandb.id}, project {self._wandb.project})")
        if self._mlflow is not None:
            out.append(f"mlflow ({self._mlflow.tracking_uri}, run {self.mlflow_run_id})")
        return out

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        if self._tb:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step) for k, v in values.items()]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
                self._mlflow.log_batch(self.mlflow_run_id, metrics=batch[i:i + 1000])

    def samples(self, rows: list[dict], step: int) -> None:
        """A table of sample generations: `rows` hold SAMPLE_COLUMNS but step."""
        rows = [{"step": step, **r} for r in rows]
        if not rows:
            return
        if self._tb:
            self._tb.add_text("samples", _markdown_table(rows), step)
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
            self._wandb.log({"samples": table}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_table(self.mlflow_run_id, {c: [r[c] for r in rows] for c in SAMPLE_COLUMNS},
                                   artifact_file=f"samples/step_{step:06d}.json")

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            run_dir = Path(self._wandb.dir).parent
            where = (f"offline in {run_dir}; upload it with `wandb sync {run_dir}`"
                     if self._wandb.settings.mode == "offline" else self._wandb.url)
            self._wandb.finish()
            logger.info("wandb run %s: %s", self._wandb.id, where)
        if self._mlflow is not None:
            self._mlflow.set_terminated(self.mlflow_run_id)
