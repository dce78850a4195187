"""The launchers as a user runs them: a subprocess, flags, exit status and what it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args,expected", [
    (["--strategy", "zero9"], "error: argument --strategy: invalid choice: 'zero9'"),  # argparse's line
    (["--local", "--trainers", "2"], "error: --local: runs the single trainer in this process; got --trainers 2"),
    (["--pretrain", "/nonexistent/model"], "error: --pretrain /nonexistent/model: no such directory"),
    (["--batch_size", "0"], "error: --batch_size: must be >= 1"),
    (["--model", "gpt2", "--pretrain", "{micro}"], "holds a 'llama' model, not 'gpt2'"),
    (["--dataset", "{missing}"], "no such file or directory"),
    (["--lr", "nan"], "error: --lr: must be a finite number, got nan"),
    (["--warmup_ratio", "nan"], "error: --warmup_ratio: must be a finite number, got nan"),
    (["--seed", "18446744073709551616"], "error: --seed: must be in [0, 4294967295], got 18446744073709551616"),
])
def test_bad_flags_give_one_clear_line_and_exit_2(args, expected, micro_model, tmp_path):
    args = [a.format(micro=micro_model, missing=tmp_path / "nope.jsonl") for a in args]
    p = run("train_sft.py", *args, "--save_path", str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_dataset_row_via_launcher_names_file_line_and_field(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n',
                    encoding="utf-8")
    p = run("train_reward_model.py", "--dataset", str(data), "--preset_size", "micro", "--eval_split", "0",
            "--save_path", str(tmp_path / "rm"))
    assert p.returncode == 2
    assert f"error: {data}, line 2, row 1, field 'rejected': missing field" in p.stderr
    assert "Traceback" not in p.stderr


def test_sft_launcher_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "sft"
    common = ["--preset_size", "micro", "--max_samples", "200", "--batch_size", "8", "--save_path", str(out),
              "--trainers", "2", "--ckpt_interval", "5", "--log_interval", "5", "--max_epochs", "3"]
    p = run("train_sft.py", *common, "--max_steps", "10")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SFT done" in p.stdout and "step 10/10" in p.stdout + p.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step_10", "step_5"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 10 and summary["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    # The same --save_path again without --resume: refused before Ray starts, the first run untouched.
    p = run("train_sft.py", *common, "--max_steps", "15")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "starting a local Ray" not in p.stderr
    line = next(l for l in p.stderr.splitlines() if "error:" in l)
    assert f"error: --save_path: {out} already holds files (chat_template.jinja, checkpoints, config.json" in line
    assert "continue that run with --resume auto, replace it with --overwrite" in p.stderr
    # the run wrote its configuration as flags; a resume that changes what is trained is refused before Ray starts
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["max_steps"], config["trainers"], config["batch_size"], config["lr"]) == (10, 2, 8, None)
    assert "resume" not in config and "overwrite" not in config
    p = run("train_sft.py", "--config", str(out / "config.yaml"), "--lr", "0.5", "--resume")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "starting a local Ray" not in p.stderr
    assert f"error: --resume: this command changes what the run in {out} trains (lr: None there, 0.5 now)" in p.stderr
    # the file repeats the run; the command line extends it (max_steps may change: a warning)
    p = run("train_sft.py", "--config", str(out / "config.yaml"), "--max_steps", "15", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and json.loads((out / "train_summary.json").read_text())["steps"] == 15
    assert "--resume: continuing with changed max_steps (10 -> 15)" in p.stderr
    # --keep_checkpoints 2 (the default): step_5 went when step_15 was written
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step_10", "step_15"]


def test_launcher_joins_a_running_cluster_with_address(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    p = run("train_reward_model.py", "--address", address, "--preset_size", "micro", "--max_samples", "64",
            "--batch_size", "8", "--max_steps", "2", "--save_path", str(tmp_path / "rm"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"joining Ray cluster at {address}" in p.stderr
    assert "RM done: held-out accuracy" in p.stdout
    # no --lr: the default for the model's size, said at start-up (the micro preset: 0.2M parameters)
    assert re.search(r"lr 2\.0e-04 \(the rm default for a 0\.\dM-parameter model \(under 100M parameters\); --lr sets "
                     r"it\)", p.stderr), p.stderr[-2000:]
    assert (tmp_path / "rm" / "config.json").exists()


@pytest.mark.parametrize("args,expected", [
    (["--advantage_estimator", "grpo"], "error: --n_samples_per_prompt: grpo compares samples of one prompt"),
    (["--experience_batch_size", "12", "--train_batch_size", "8"], "error: --train_batch_size: a step's 12 samples"),
    (["--rm_path", "/nonexistent/rm"], "error: --rm_path: /nonexistent/rm: no such model directory"),
    (["--custom_resources", "{\"gpu_box\": 1}"], "error: --custom_resources: expected a JSON object {role:"),
    # issue 15: values that compared False with every bound, and plans and paths caught only after Ray started
    (["--lr", "nan"], "error: --lr: must be a finite number, got nan"),
    (["--kl_coef", "inf"], "error: --kl_coef: must be a finite number, got inf"),
    (["--grad_clip", "nan"], "error: --grad_clip: must be a finite number, got nan"),
    (["--actors", "64"], "error: --actors: 69 actor processes (64 generators"),
    (["--rm_path", "{tmp}"], "is not a model directory"),
    (["--resume", "{tmp}"], "is not a PPO checkpoint (no ppo_state.json in it)"),
    # issue 16: reward sources, checked before Ray starts (the function file is not run in the driver)
    (["--reward_fn", "{tmp}/missing.py:score"], "error: --reward_fn: {tmp}/missing.py: no such file"),
    (["--reward_fn", "math", "--reward_weights", "1,2,3"], "error: --reward_weights: 3 weights for 2 reward sources"),
    (["--reward_url", "localhost:8000"], "error: --reward_url: expected an http:// or https:// URL"),
])
def test_ppo_bad_flags_give_one_clear_line_and_exit_2(args, expected, micro_model, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    expected = expected.replace("{tmp}", str(tmp_path))
    p = run("ppo_cluster.py", "--pretrain", micro_model, "--rm_path", micro_model, *args,
            "--save_path", str(tmp_path / "ppo"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in p.stderr
    assert "Traceback" not in p.stderr
    assert "starting a local Ray" not in p.stderr  # refused before any actor (or Ray) starts


def test_ppo_launcher_bad_prompt_row_names_file_and_line_before_ray_starts(micro_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 + 1?"}\n{"question": "2 + 2?"}\n', encoding="utf-8")
    p = run("ppo_cluster.py", str(prompts), "--pretrain", micro_model, "--rm_path", micro_model,
            "--save_path", str(tmp_path / "ppo"))
    assert p.returncode == 2
    assert f"error: {prompts}, line 2, row 1, field 'prompt': missing field" in p.stderr
    assert "starting a local Ray" not in p.stderr  # nothing was started for a file that cannot work


def test_ppo_launcher_runs_on_a_positional_prompts_csv(micro_model, demo_dir, tmp_path):
    # With Ray's token auth as a user has it (on): the embedded Ray writes ~/.ray/auth_token (here
    # under a private HOME) and the launcher says where the dashboard is and how to sign in.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(tmp_path / "home"), TOKENIZERS_PARALLELISM="false")
    p = run("ppo_cluster.py", str(demo_dir / "prompts_train.csv"), "--pretrain", micro_model, "--rm_path",
            micro_model, "--actors", "2", "--max_steps", "2", "--experience_batch_size", "8", "--train_batch_size",
            "8", "--max_new_tokens", "8", "--save_path", str(tmp_path / "ppo"), timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in p.stderr and "ray get-auth-token" in p.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()
    assert "PPO done: 2 steps" in p.stdout
    assert "step 2/2 | reward" in p.stdout + p.stderr  # one metrics line per step
    assert (tmp_path / "ppo" / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "checkpoints" / "step_2" / "ppo_state.json").exists()
    assert list((tmp_path / "ppo" / "tensorboard").iterdir())
    # the user sees our lines, not the libraries': the restartable generators take the scoring actors by
    # name (no Ray error line about their arguments), and Ray's own token-auth notice gives way to ours
    assert "has constructor arguments in the object store" not in p.stderr
    assert "Token authentication is enabled" not in p.stderr and "(token auth on; the token: " in p.stderr


@pytest.mark.parametrize("script,args,expected", [  # found by scripts/probe.py (docs/reliability.md)
    ("serve.py", ["{micro}", "--port", "70000"], "error: --port: must be in 0..65535, got 70000"),
    ("serve.py", ["{micro}", "--port", "{busy}"], "error: --port: cannot listen on 127.0.0.1:{busy}: already in use"),
    ("serve.py", ["{micro}", "--context_len", "0"], "error: --context_len: must be >= 2"),
    ("control.py", ["--status", "--address", "127.0.0.1:{closed}"], "error: --address: nothing answers at 127.0.0.1:"),
    ("demo.py", ["--ppo_lr", "nan"], "error: --ppo_lr: must be a finite number, got nan"),
    ("demo.py", ["--sft_lr", "inf"], "error: --sft_lr: must be a finite number, got inf"),
])
def test_more_launchers_refuse_bad_flags_before_loading_anything(script, args, expected, micro_model, tmp_path):
    import socket

    with socket.socket() as busy, socket.socket() as closed:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        closed.bind(("127.0.0.1", 0))
        ports = {"micro": micro_model, "busy": busy.getsockname()[1], "closed": closed.getsockname()[1]}
        closed.close()  # nothing listens there now
        args = [a.format(**ports) for a in args]
        p = run(script, *args, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected.format(**ports) in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "starting a local Ray" not in p.stderr
