"""Reward sources in a real PPO run on a local Ray: a function file, the math verifier, the example
reward server, a weighted mix with a reward model; a failing function; resume with a function.

The policy is the untrained micro preset: what is tested is where scores come from and that they
reach the trainer for the right rows, not learning."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coati_ray.pipelines.ppo import run_ppo
from coati_ray.ppo_config import PPOConfig
from coati_ray.rewards.functions import RewardError

ROOT = Path(__file__).resolve().parents[2]

# Checks that prompts and columns stay aligned (raises otherwise) and scores each row by its target.
ALIGNED = '''
def score(prompts, responses, target, tag, **other_columns):
    for p, t, g in zip(prompts, target, tag):
        if p != f"Question {t}: how many?" or g != f"t{t}":
            raise ValueError(f"row mix-up: {p!r} got target {t!r}, tag {g!r}")
    return [float(t) for t in target]
'''


def prompts_file(tmp_path, n: int = 8) -> str:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Question {i}: how many?", "target": i, "tag": f"t{i}",
                                     "answer": str(i)}) + "\n" for i in range(n)), encoding="utf-8")
    return str(f)


def ppo(micro_model, tmp_path, name: str, **kw):
    args = {"prompt_dataset": prompts_file(tmp_path), "experience_batch_size": 4, "n_samples_per_prompt": 2,
            "train_batch_size": 8, "max_new_tokens": 8, "max_steps": 2, "advantage_estimator": "grpo",
            "sync_check_interval": 0, "log_interval": 1000, "save_path": str(tmp_path / name), **kw}
    return run_ppo(PPOConfig.of(pretrain=micro_model, **args), progress=False)


def expected_step_means(tmp_path, steps: int, seed: int = 42, batch: int = 4) -> list[float]:
    """Mean target of each step's prompt rows (the rows a step takes are a function of seed and step)."""
    from coati_ray.workers.chunks import step_prompts

    return [sum(step_prompts(s, 8, batch, seed)) / batch for s in range(steps)]


def test_a_function_file_scores_every_row_by_its_own_columns_and_no_critic_or_rm_starts(ray_cluster, micro_model,
                                                                                       tmp_path):
    fn = tmp_path / "my_rewards.py"
    fn.write_text(ALIGNED)
    r = ppo(micro_model, tmp_path, "fn", reward_fn=f"{fn}:score")
    means = expected_step_means(tmp_path, 2)
    for m, want in zip(r.history, means):
        assert m["reward/score"] == pytest.approx(want) and m["reward/mean"] == pytest.approx(want)
        assert m["reward/score_std"] > 0  # rows with different targets
    assert not any(name.startswith("critic-") for name in r.placement)  # grpo with no RM: no critic
    summary = json.loads((tmp_path / "fn" / "ppo_summary.json").read_text())
    assert summary["reward_model"] is None
    assert summary["reward_sources"] == [{"name": "score", "kind": "fn", "target": f"{fn}:score", "weight": 1.0}]


# Message prompts: the function sees the last user turn as the prompt and the whole conversation as `messages`.
CONVERSATION = '''
def score(prompts, responses, target, messages, **other_columns):
    for p, t, m in zip(prompts, target, messages):
        if p != f"Question {t}: how many?" or m[0]["role"] != "system" or m[-1]["content"] != p or len(m) != 4:
            raise ValueError(f"row mix-up: {p!r}, {m!r}")
    return [float(t) for t in target]
'''


def test_message_prompts_are_continued_and_graded_on_their_last_user_turn(ray_cluster, micro_model, tmp_path):
    f = tmp_path / "chat_prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": "Count."},
                                                {"role": "user", "content": "Earlier?"},
                                                {"role": "assistant", "content": "Yes."},
                                                {"role": "user", "content": f"Question {i}: how many?"}],
                                     "target": i}) + "\n" for i in range(8)), encoding="utf-8")
    fn = tmp_path / "conv_rewards.py"
    fn.write_text(CONVERSATION)
    r = ppo(micro_model, tmp_path, "conv", reward_fn=f"{fn}:score", prompt_dataset=str(f))
    for m, want in zip(r.history, expected_step_means(tmp_path, 2)):
        assert m["reward/mean"] == pytest.approx(want)


def test_a_weighted_mix_of_the_reward_model_and_the_math_verifier(ray_cluster, micro_model, tmp_path):
    r = ppo(micro_model, tmp_path, "mix", rm_path=micro_model, reward_fn="math", reward_weights="0.5,2")
    for m in r.history:
        assert {"reward/rm", "reward/math", "reward/rm_std", "reward/math_std"} <= set(m)
        assert 0.0 <= m["reward/math"] <= 1.0
        assert m["reward/mean"] == pytest.approx(0.5 * m["reward/rm"] + 2 * m["reward/math"], abs=1e-5)


def test_the_example_reward_server_scores_through_reward_url(ray_cluster, micro_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fn = tmp_path / "my_rewards.py"
    fn.write_text(ALIGNED)
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "reward_server.py"), "--reward_fn",
                               f"{fn}:score", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        import requests

        deadline = time.monotonic() + 60
        while True:  # until the server answers (bounded)
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "reward server did not start in 60 s"
            time.sleep(0.2)
        r = ppo(micro_model, tmp_path, "url", reward_url=f"http://127.0.0.1:{port}/score", reward_max_inflight=2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for m, want in zip(r.history, expected_step_means(tmp_path, 2)):
        assert m["reward/remote"] == pytest.approx(want)


def test_a_function_that_raises_stops_the_run_with_one_line_and_keeps_the_checkpoint(ray_cluster, micro_model,
                                                                                      tmp_path):
    fn = tmp_path / "flaky.py"  # fails from its third call on (a step is 2 chunks of one call each)
    fn.write_text("calls = []\ndef score(prompts, responses, **cols):\n    calls.append(1)\n"
                  "    if len(calls) > 2:\n        raise KeyError('no judge for ' + prompts[0][:12])\n"
                  "    return [0.0] * len(prompts)\n")
    with pytest.raises(RewardError) as e:
        ppo(micro_model, tmp_path, "fail", reward_fn=f"{fn}:score", max_steps=4, ckpt_interval=1,
            experience_batch_size=2, train_batch_size=4, reward_workers=1)
    msg = str(e.value)
    assert msg.startswith(f"reward function {fn}:score raised on sample ") and "KeyError" in msg, msg
    assert "\n" not in msg
    ckpt = tmp_path / "fail" / "checkpoints" / "step_1"
    assert (ckpt / "ppo_state.json").exists()  # the resume point survives


def test_a_resumed_run_with_a_reward_function_gets_the_same_samples_and_rewards(ray_cluster, micro_model, tmp_path):
    fn = tmp_path / "my_rewards.py"
    fn.write_text("def score(prompts, responses, **cols):\n    return [float(len(r)) for r in responses]\n")
    full = ppo(micro_model, tmp_path, "full", reward_fn=f"{fn}:score", max_steps=2)
    ppo(micro_model, tmp_path, "split", reward_fn=f"{fn}:score", max_steps=1)
    resumed = ppo(micro_model, tmp_path, "split", reward_fn=f"{fn}:score", max_steps=2, resume="auto")
    assert resumed.start_step == 1 and len(resumed.history) == 1
    for a, b in zip(full.history[1:], resumed.history):  # rewards depend on the sampled responses
        assert a["reward/score"] == pytest.approx(b["reward/score"], abs=1e-6)
        assert a["response/length"] == pytest.approx(b["response/length"], abs=1e-6)


@pytest.mark.parametrize("recipe", ["rlvr", "dapo"])
def test_the_demo_runs_its_verifier_recipes_without_a_reward_model(ray_cluster, tmp_path, recipe):
    from coati_ray.pipelines.demo import DemoArgs, run_demo

    s = run_demo(DemoArgs(recipe=recipe, preset_size="micro", sft_epochs=1, batch_size=64, ppo_steps=2,
                          eval_prompts=8, out=str(tmp_path / "demo")))
    assert s["recipe"] == recipe and s["reward"] == "demo" and s["rm"] is None
    assert s["ppo"]["steps"] == 2 and 0.0 <= s["gold"]["ppo"] <= 1.0
    assert not (tmp_path / "demo" / "rm").exists()
    summary = json.loads((tmp_path / "demo" / "ppo" / "ppo_summary.json").read_text())
    assert [r["name"] for r in summary["reward_sources"]] == ["demo"]
    assert summary["ppo_args"]["dynamic_sampling"] is (recipe == "dapo")
