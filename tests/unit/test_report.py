"""`coati report RUN_DIR`: the PNG's panels (read back from the PNG's own metadata), the page's values."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from coati_ray.commands.report import main as report_main
from coati_ray.errors import ConfigError
from coati_ray.run_dir import start_run
from coati_ray.tracking import Trackers

PPO_KEYS = ("reward/mean", "kl/mean", "policy/loss", "value/loss", "response/length", "policy/clipfrac",
            "value/clipfrac", "perf/samples_per_s")


def fake_run(save, stage: str, metrics) -> str:
    """A run directory as the pipelines leave it: run.json, config.yaml and TensorBoard scalars."""
    run_id = start_run(str(save), stage, "no", False, {"run": {"save_path": str(save)}})
    t = Trackers(["tensorboard"], str(save), stage, run_id, {"run": {}})
    for step in range(1, 7):
        t.scalars(metrics(step), step)
    t.close()
    return run_id


def ppo_metrics(step: int) -> dict:
    return {k: step * (i + 1) / 10 for i, k in enumerate(PPO_KEYS)}


def panels_of(png) -> list[str]:
    return json.loads(Image.open(png).text["coati:panels"])


def test_a_ppo_run_report_has_every_ppo_panel_and_the_last_values(tmp_path):
    run_id = fake_run(tmp_path / "ppo", "ppo", ppo_metrics)
    png, page = report_main([str(tmp_path / "ppo")])
    assert png == tmp_path / "ppo" / "report.png" and png.stat().st_size > 10_000
    assert panels_of(png) == ["reward", "KL to the reference", "policy loss", "value loss", "response length (tokens)",
                              "clip fraction", "samples/s"]
    img = Image.open(png)
    assert img.size == (1680, 640)  # 4 columns x 2 rows of panels
    text = page.read_text()
    assert f"(run {run_id})" in text and "data:image/png;base64," in text
    assert "<td>clip fraction</td><td>value/clipfrac</td><td>6</td><td>4.2</td>" in text  # 6 steps, 6 * 7 / 10


def test_a_grpo_run_without_a_critic_leaves_the_value_panel_out(tmp_path):
    fake_run(tmp_path / "grpo", "ppo", lambda s: {k: v for k, v in ppo_metrics(s).items() if not k.startswith("value")})
    png, _ = report_main([str(tmp_path / "grpo"), "--dpi", "50"])
    assert Image.open(png).size == (840, 320)  # 6 panels: 4 columns x 2 rows at 50 dpi
    assert "value loss" not in panels_of(png) and "clip fraction" in panels_of(png)


def test_a_demo_report_shows_each_stage_and_the_gold_score_before_and_after(tmp_path):
    fake_run(tmp_path / "sft", "sft", lambda s: {"train/loss": 3 / s, "train/lr": 1e-4, "perf/tokens_per_s": 900.0})
    fake_run(tmp_path / "rm", "rm", lambda s: {"train/loss": 0.7 / s, "train/acc": 0.5 + s / 20,
                                                 "eval/accuracy": 0.5 + s / 25})
    fake_run(tmp_path / "ppo", "ppo", ppo_metrics)
    (tmp_path / "demo_summary.json").write_text(json.dumps({"gold": {"sft": 0.105, "ppo": 0.985, "prompts": 64}}))
    png, page = report_main([str(tmp_path)])
    shown = panels_of(png)
    assert shown[:5] == ["SFT: loss", "SFT: learning rate", "SFT: tokens/s", "RM: loss", "RM: accuracy"]
    assert "RM: margin" not in shown  # not logged
    assert shown[5:12] == [f"PPO: {t}" for t in ("reward", "KL to the reference", "policy loss", "value loss",
                                                 "response length (tokens)", "clip fraction", "samples/s")]
    assert shown[-1] == "gold score: sft -> ppo"
    assert Image.open(png).size[1] == math.ceil(len(shown) / 4) * 320
    assert "<td>gold score: sft -&gt; ppo</td><td>ppo</td><td>1</td><td>0.985</td>" in page.read_text()


def test_a_directory_that_is_no_run_is_refused_with_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match="no run.json or demo_summary.json; expected the --save_path of a coati"):
        report_main([str(tmp_path)])
    start_run(str(tmp_path / "bare"), "ppo", "no", False, {})
    with pytest.raises(ConfigError, match="has no tensorboard/"):
        report_main([str(tmp_path / "bare")])
    with pytest.raises(ConfigError, match="give the run directory"):
        report_main([])
    with pytest.raises(ConfigError, match=r"--dpi: must be in \[20, 600\], got 5"):
        report_main([str(tmp_path / "bare"), "--dpi", "5"])
