import json
import random

import pytest

from coati_ray.data import demo


def test_same_seed_writes_identical_files_and_other_seed_differs(tmp_path):
    a = demo.write_demo_data(tmp_path / "a", seed=1, n_sft=50, n_pairs=50, n_prompts=20, n_eval=10, n_pretrain=10)
    b = demo.write_demo_data(tmp_path / "b", seed=1, n_sft=50, n_pairs=50, n_prompts=20, n_eval=10, n_pretrain=10)
    c = demo.write_demo_data(tmp_path / "c", seed=2, n_sft=50, n_pairs=50, n_prompts=20, n_eval=10, n_pretrain=10)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["pretrain.jsonl", "prompts_eval.jsonl", "prompts_train.csv", "prompts_train.jsonl",
                     "rm_eval.jsonl", "rm_train.jsonl", "sft_eval.jsonl", "sft_train.json"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    assert (a / "sft_train.json").read_bytes() != (c / "sft_train.json").read_bytes()


def test_files_have_the_seeds_columns_and_both_languages(demo_dir):
    sft = json.loads((demo_dir / "sft_train.json").read_text(encoding="utf-8"))
    assert set(sft[0]) == {"instruction", "input", "output"}
    pairs = [json.loads(l) for l in (demo_dir / "rm_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert (demo_dir / "prompts_train.csv").read_text(encoding="utf-8").splitlines()[0] == "prompt"
    langs = {demo.solve(r["prompt"]).lang for r in pairs if isinstance(r.get("prompt"), str)}
    assert langs == {"en", "zh"}
    assert any(r["input"] for r in sft) and any(not r["input"] for r in sft)


@pytest.mark.parametrize("index", range(len(demo.TEMPLATES)))
def test_gold_score_recovers_every_template(index):
    lang, op, template = demo.TEMPLATES[index]
    text = template.format(name="Tom" if lang == "en" else "小明", item="apple" if lang == "en" else "个苹果", a=7, b=3)
    p = demo.solve("some system text. " + text)
    assert (p.lang, p.op, p.a, p.b) == (lang, op, 7, 3)
    expected = {"+": 10, "-": 4, "*": 21}[op]
    right = f"The answer is {expected}." if lang == "en" else f"答案是{expected}。"
    wrong = f"The answer is {expected + 1}." if lang == "en" else f"答案是{expected + 1}。"
    assert demo.gold_score(text, right) == 1.0
    assert demo.gold_score(text, wrong) == 0.0
    assert demo.gold_score(text, "no idea") == 0.0


def test_gold_score_rejects_foreign_prompt():
    with pytest.raises(ValueError, match="not a demo arithmetic prompt"):
        demo.gold_score("Write a poem about the sea.", "The answer is 3.")


def test_chosen_always_scores_one_and_rejected_never_beats_it():
    rng = random.Random(0)
    for _ in range(300):
        p = demo.make_problem(rng)
        assert demo.gold_score(p.text, demo.solution(p)) == 1.0
        assert demo.gold_score(p.text, demo.rejected_response(p, rng)) == 0.0


def test_equation_score_checks_the_sum_whatever_the_answer_style():
    p = demo.Problem("en", "*", 6, 7,
                     "Tom buys 6 bags with 7 apples in each bag. How many apples does Tom buy in total?")
    terse = demo.terse_solution(p)
    assert terse == "6 * 7 = 42."
    assert (demo.equation_score(p.text, terse), demo.gold_score(p.text, terse)) == (1.0, 0.0)
    assert (demo.equation_score(p.text, demo.solution(p)), demo.gold_score(p.text, demo.solution(p))) == (1.0, 1.0)
    assert demo.equation_score(p.text, demo.solution(p, answer=41, shown=41)) == 0.0
    assert demo.equation_score(p.text, "no equation") == 0.0
    zh = demo.Problem("zh", "-", 9, 4, "小明有9个苹果，送给朋友4个苹果。小明还剩多少个苹果？")
    assert demo.terse_solution(zh) == "9 - 4 = 5。" and demo.equation_score(zh.text, demo.terse_solution(zh)) == 1.0


def test_demonstrations_mix_both_styles_and_pairs_prefer_the_stated_answer(demo_dir):
    """What leaves PPO something to do: SFT sees both styles; the pairs rank the graded one higher."""
    sft = [r for r in json.loads((demo_dir / "sft_train.json").read_text(encoding="utf-8")) if "output" in r]
    stated = [demo.extract_answer(r["output"]) is not None for r in sft]
    assert 0.4 < sum(stated) / len(stated) < 0.6  # TERSE_FRACTION = 0.5 of 4000 rows
    pairs = [json.loads(l) for l in (demo_dir / "rm_train.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [r for r in pairs if isinstance(r.get("prompt"), str)]  # the single-turn ones
    terse_rejected = [r for r in pairs if demo.extract_answer(r["rejected"]) is None]
    assert 0.2 < len(terse_rejected) / len(pairs) < 0.4  # TERSE_PAIR_FRACTION = 0.3
    for r in pairs:
        assert demo.gold_score(r["prompt"], r["chosen"]) == 1.0
        assert demo.gold_score(r["prompt"], r["rejected"]) == 0.0
    for r in terse_rejected:
        assert demo.equation_score(r["prompt"], r["rejected"]) == 1.0  # right sum, no stated answer


def test_a_share_of_every_training_file_is_conversational_and_graded_on_its_last_user_turn(demo_dir):
    from coati_ray.data.conversations import last_user_text, read_messages, read_prompt, split_implicit_prompt

    sft = json.loads((demo_dir / "sft_train.json").read_text(encoding="utf-8"))
    chats = [r.get("messages") or r.get("conversations") for r in sft if "output" not in r]
    assert len(chats) == 400 and sum("conversations" in r for r in sft) == 200  # OpenAI and ShareGPT forms
    dialogues = [read_messages(c, need_assistant=True) for c in chats]  # each one reads exactly
    assert {len([m for m in d if m["role"] == "assistant"]) for d in dialogues} == {2, 3}
    assert 0.3 < sum(d[0]["role"] == "system" for d in dialogues) / len(dialogues) < 0.7
    langs = {demo.solve(m["content"]).lang for d in dialogues for m in d if m["role"] == "user"}
    assert langs == {"en", "zh"}
    for d in dialogues:  # one language per dialogue
        assert len({demo.solve(m["content"]).lang for m in d if m["role"] == "user"}) == 1
    pairs = [json.loads(l) for l in (demo_dir / "rm_train.jsonl").read_text(encoding="utf-8").splitlines()]
    conv = [r for r in pairs if not isinstance(r.get("prompt"), str)]
    assert len(conv) == 300 and sum("prompt" not in r for r in conv) == 150  # half in the implicit-prompt form
    for r in conv:
        prompt, chosen, rejected = (split_implicit_prompt(r["chosen"], r["rejected"]) if "prompt" not in r
                                    else (read_prompt(r["prompt"]), r["chosen"], r["rejected"]))
        assert demo.gold_score(last_user_text(prompt), chosen) == 1.0
        assert demo.gold_score(last_user_text(prompt), rejected) == 0.0
    prompts = [json.loads(l) for l in (demo_dir / "prompts_train.jsonl").read_text(encoding="utf-8").splitlines()]
    conv_prompts = [r for r in prompts if isinstance(r["prompt"], list)]
    assert len(conv_prompts) == 100
    assert all(demo.solve(last_user_text(read_prompt(r["prompt"]))).answer == r["answer"] for r in conv_prompts)
