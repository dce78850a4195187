"""Bilingual (English / Chinese) arithmetic word problems: the demo task for all three stages.

The task has a known gold scorer (`gold_score`), so later stages can measure whether a policy
got better at the task, not only whether a loss fell. Like GSM8K's `#### N`, the grader reads
the final answer from a fixed phrase ("The answer is N" / "答案是N").

Why there is something left for RLHF to do: the demonstrations come from annotators with two
styles. Half of them end with the graded final-answer sentence; the other half stop at the
equation ("7 + 3 = 10."), which is right but states no final answer the grader can read. SFT
imitates both; greedy, the tiny SFT policy answers tersely on 70-90% of prompts. The preference
pairs say what the demonstrations do not: an answer that states its final result beats a terse
one, and a right result beats a wrong one. A reward model learns that, and PPO moves the policy
to the preferred style, which the gold score sees; SFT alone cannot, as it has no signal that
one style is better. (A toy model of why InstructGPT-style RLHF helps after SFT.)

Everything is generated from a seed, so the same seed always writes byte-identical files.

Files written by `write_demo_data(dir)` (the seed's formats):

| file               | stage | format | columns                          |
|--------------------|-------|--------|----------------------------------|
| sft_train.json     | SFT   | JSON list (Alpaca style) | instruction, input, output |
| sft_eval.jsonl     | SFT   | JSONL  | instruction, input, output       |
| rm_train.jsonl     | RM    | JSONL  | prompt, chosen, rejected         |
| rm_eval.jsonl      | RM    | JSONL  | prompt, chosen, rejected         |
| prompts_train.csv  | PPO   | CSV    | prompt                           |
| prompts_train.jsonl| PPO   | JSONL  | prompt, answer                   |
| prompts_eval.jsonl | PPO   | JSONL  | prompt, answer (held out)        |
| pretrain.jsonl     | PTX   | JSONL  | text                             |

Besides the seed's single-turn rows, a share of each stage's training file is conversational
(`CHAT_FRACTION`, drawn from its own random stream so the single-turn rows stay what they were):
SFT dialogues of two or three problems, in OpenAI `messages` and ShareGPT `conversations` form, half
with a system prompt; preference pairs whose prompt is such a dialogue (with `prompt` as messages, or
TRL's implicit-prompt form of two whole conversations); PPO prompts as [system, user] messages. The
graded prompt is always the last user turn.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAMES_EN = ["Tom", "Anna", "Lily", "Jack", "Mia", "Leo", "Emma", "Sam"]
NAMES_ZH = ["小明", "小红", "小刚", "小丽", "阿强", "小芳", "老王", "小李"]
ITEMS_EN = ["apple", "book", "pen", "ball", "cookie", "flower", "card", "egg"]
# Chinese measure words are part of the item so the templates stay simple.
ITEMS_ZH = ["个苹果", "本书", "支笔", "个球", "块饼干", "朵花", "张卡片", "个鸡蛋"]

# (language, op, template). Each template names {name}, {a}, {b}, {item} exactly once or more;
# `_TEMPLATE_RES` turns them into regexes so `gold_score` can recover a and b from a prompt.
TEMPLATES: list[tuple[str, str, str]] = [
    ("en", "+", "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"),
    ("en", "+", "There are {a} {item}s in a box and {name} puts in {b} more. How many {item}s are in the box?"),
    ("en", "-", "{name} has {a} {item}s and gives away {b}. How many {item}s are left?"),
    ("en", "-", "A shelf holds {a} {item}s. {name} takes {b} of them. How many {item}s remain on the shelf?"),
    ("en", "*", "{name} buys {a} bags with {b} {item}s in each bag. How many {item}s does {name} buy in total?"),
    ("zh", "+", "{name}有{a}{item}，又得到了{b}{item}。{name}现在一共有多少{item}？"),
    ("zh", "+", "盒子里有{a}{item}，{name}又放进去{b}{item}。盒子里有多少{item}？"),
    ("zh", "-", "{name}有{a}{item}，送给朋友{b}{item}。{name}还剩多少{item}？"),
    ("zh", "-", "架子上有{a}{item}，{name}拿走了{b}{item}。架子上还剩多少{item}？"),
    ("zh", "*", "{name}买了{a}袋，每袋有{b}{item}。{name}一共买了多少{item}？"),
]
ZH_SOLVE_INSTRUCTION = "解答下面的应用题。"
EN_SOLVE_INSTRUCTION = "Solve the following word problem."
TERSE_FRACTION = 0.5  # SFT demonstrations that stop at the equation (see the module docstring)
TERSE_PAIR_FRACTION = 0.3  # preference pairs whose rejected answer is the terse one
CHAT_FRACTION = 0.1  # rows appended to each training file as conversations (see the module docstring)
SYSTEM_PROMPTS = {"en": "You are a helpful math tutor.", "zh": "你是一位耐心的数学老师。"}


def _template_regex(template: str) -> re.Pattern[str]:
    out, seen = "", set()
    for part in re.split(r"(\{\w+\})", template):
        m = re.fullmatch(r"\{(\w+)\}", part)
        if not m:
            out += re.escape(part)
        elif m.group(1) in seen:
            out += f"(?P={m.group(1)})"
        else:
            seen.add(m.group(1))
            out += rf"(?P<{m.group(1)}>\d+)" if m.group(1) in ("a", "b") else rf"(?P<{m.group(1)}>.+?)"
    return re.compile(out)


_TEMPLATE_RES = [(lang, op, _template_regex(t)) for lang, op, t in TEMPLATES]
_ANSWER_RES = [re.compile(r"[Tt]he answer is (-?\d+)"), re.compile(r"答案是\s*(-?\d+)")]
_EQUATION_RE = re.compile(r"=\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    lang: str  # "en" | "zh"
    op: str  # "+" | "-" | "*"
    a: int
    b: int
    text: str

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]


def solve(prompt: str) -> Problem | None:
    """Recover the problem from a prompt written by this module (anywhere inside `prompt`)."""
    for lang, op, rx in _TEMPLATE_RES:
        m = rx.search(prompt)
        if m:
            return Problem(lang, op, int(m.group("a")), int(m.group("b")), m.group(0))
    return None


def extract_answer(response: str) -> int | None:
    """The number after 'The answer is' / '答案是' (the first occurrence), or None."""
    for rx in _ANSWER_RES:
        m = rx.search(response)
        if m:
            return int(m.group(1))
    return None


def gold_score(prompt: str, response: str) -> float:
    """1.0 when the response states the correct final answer, else 0.0.

    Raises ValueError for a prompt this module did not write (no gold answer is known).
    """
    problem = solve(prompt)
    if problem is None:
        raise ValueError(f"not a demo arithmetic prompt: {prompt[:80]!r}")
    return 1.0 if extract_answer(response) == problem.answer else 0.0


def equation_score(prompt: str, response: str) -> float:
    """1.0 when the first equation's result ("= N") is right, stated final answer or not.

    The arithmetic alone: what SFT teaches regardless of the answer style `gold_score` grades.
    """
    problem = solve(prompt)
    if problem is None:
        raise ValueError(f"not a demo arithmetic prompt: {prompt[:80]!r}")
    m = _EQUATION_RE.search(response)
    return 1.0 if m and int(m.group(1)) == problem.answer else 0.0


def make_problem(rng: random.Random) -> Problem:
    lang, op, template = TEMPLATES[rng.randrange(len(TEMPLATES))]
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if op == "-" and b > a:
        a, b = b, a
    names, items = (NAMES_EN, ITEMS_EN) if lang == "en" else (NAMES_ZH, ITEMS_ZH)
    text = template.format(name=rng.choice(names), item=rng.choice(items), a=a, b=b)
    return Problem(lang, op, a, b, text)


def solution(p: Problem, answer: int | None = None, shown: int | None = None) -> str:
    """A worked answer. `shown` is the result written in the equation, `answer` the final one."""
    answer = p.answer if answer is None else answer
    shown = answer if shown is None else shown
    if p.lang == "en":
        return f"{p.a} {p.op} {p.b} = {shown}. The answer is {answer}."
    return f"{p.a} {p.op} {p.b} = {shown}，答案是{answer}。"


def terse_solution(p: Problem) -> str:
    """The right equation without the final-answer sentence: correct, but nothing for the grader."""
    return f"{p.a} {p.op} {p.b} = {p.answer}" + ("." if p.lang == "en" else "。")


def demonstration(p: Problem, rng: random.Random, terse_fraction: float = TERSE_FRACTION) -> str:
    """What an annotator wrote for the SFT set: the full solution, or (terse_fraction) the terse one."""
    return terse_solution(p) if rng.random() < terse_fraction else solution(p)


def _wrong(p: Problem, rng: random.Random) -> int:
    while True:
        w = p.answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        if w >= 0 and w != p.answer:
            return w


def rejected_response(p: Problem, rng: random.Random) -> str:
    """A worse answer than `solution(p)`: the terse answer (TERSE_PAIR_FRACTION of the pairs), a
    wrong result, or a right result with a wrong final answer.

    Besides the terse style, only "hard" negatives, on purpose. With easy ones mixed in
    (evasive, truncated or rambling answers), the reward model separates those within a few
    dozen steps and then stays at chance on wrong arithmetic (measured on the micro preset:
    0.55-0.65 on wrong answers with easy negatives present, 0.94 without) — a case of gradient
    starvation (Pezeshki et al. 2021, https://arxiv.org/abs/2011.09468). An RM that cannot tell
    a wrong sum from a right one would let PPO trade right sums for the preferred style; the
    demo's PPO policy keeps them all (equation_score 1.000, tiny preset, three seeds).
    """
    if rng.random() < TERSE_PAIR_FRACTION:
        return terse_solution(p)
    if rng.random() < 0.7:
        return solution(p, answer=_wrong(p, rng))
    return solution(p, answer=_wrong(p, rng), shown=p.answer)


def as_instruction(p: Problem, rng: random.Random) -> tuple[str, str]:
    """(instruction, input): the problem alone, or a fixed instruction with the problem as input."""
    if rng.random() < 0.3:
        return (EN_SOLVE_INSTRUCTION if p.lang == "en" else ZH_SOLVE_INSTRUCTION), p.text
    return p.text, ""


def pretrain_text(rng: random.Random) -> str:
    p = make_problem(rng)
    return p.text + " " + solution(p) if rng.random() < 0.5 else f"{p.a} {p.op} {p.b} = {p.answer}"


def dialogue(rng: random.Random, turns: int, system: bool) -> list[dict]:
    """[system?] user / assistant turns, one problem per user turn, all in one language."""
    first = make_problem(rng)
    msgs = [{"role": "system", "content": SYSTEM_PROMPTS[first.lang]}] if system else []
    p = first
    for k in range(turns):
        while k and p.lang != first.lang:
            p = make_problem(rng)
        msgs += [{"role": "user", "content": p.text}, {"role": "assistant", "content": demonstration(p, rng)}]
        p = make_problem(rng)
    return msgs


def as_sharegpt(msgs: list[dict]) -> list[dict]:
    return [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in msgs]


def chat_sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        msgs = dialogue(rng, rng.choice([2, 3]), system=rng.random() < 0.5)
        rows.append({"messages": msgs} if i % 2 == 0 else {"conversations": as_sharegpt(msgs)})
    return rows


def chat_pair_rows(rng: random.Random, n: int) -> list[dict]:
    """Pairs on the last problem of a dialogue; every other row in TRL's implicit-prompt form."""
    rows = []
    for i in range(n):
        context = dialogue(rng, 1, system=rng.random() < 0.5)
        p = make_problem(rng)
        while p.lang != solve(context[-2]["content"]).lang:
            p = make_problem(rng)
        prompt = context + [{"role": "user", "content": p.text}]
        chosen, rejected = solution(p), rejected_response(p, rng)
        if i % 2 == 0:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"chosen": prompt + [{"role": "assistant", "content": chosen}],
                         "rejected": prompt + [{"role": "assistant", "content": rejected}]})
    return rows


def write_demo_data(out_dir: str | Path, seed: int = 42, n_sft: int = 4000, n_pairs: int = 3000,
                    n_prompts: int = 1000, n_eval: int = 200, n_pretrain: int = 2000) -> Path:
    """Write every demo file into `out_dir` (created). Deterministic in `seed`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def sft_rows(n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            p = make_problem(rng)
            instruction, inp = as_instruction(p, rng)
            rows.append({"instruction": instruction, "input": inp, "output": demonstration(p, rng)})
        return rows

    def pair_rows(n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            p = make_problem(rng)
            rows.append({"prompt": p.text, "chosen": solution(p), "rejected": rejected_response(p, rng)})
        return rows

    def prompt_rows(n: int) -> list[dict]:
        return [{"prompt": (p := make_problem(rng)).text, "answer": p.answer} for _ in range(n)]

    chat_rng = random.Random(seed * 7919 + 1)  # the conversations' own stream
    sft_train, sft_eval = sft_rows(n_sft), sft_rows(n_eval)
    pairs_train, pairs_eval = pair_rows(n_pairs), pair_rows(n_eval)
    prompts = prompt_rows(n_prompts)
    with open(out / "sft_train.json", "w", encoding="utf-8") as f:
        json.dump(sft_train + chat_sft_rows(chat_rng, int(n_sft * CHAT_FRACTION)), f, ensure_ascii=False, indent=1)
    _write_jsonl(out / "sft_eval.jsonl", sft_eval)
    _write_jsonl(out / "rm_train.jsonl", pairs_train + chat_pair_rows(chat_rng, int(n_pairs * CHAT_FRACTION)))
    _write_jsonl(out / "rm_eval.jsonl", pairs_eval)
    chat_prompts = [{"prompt": [{"role": "system", "content": SYSTEM_PROMPTS[p.lang]},
                                {"role": "user", "content": p.text}], "answer": p.answer}
                    for p in (make_problem(chat_rng) for _ in range(int(n_prompts * CHAT_FRACTION)))]
    _write_jsonl(out / "prompts_train.jsonl", prompts + chat_prompts)
    with open(out / "prompts_train.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        w.writerows([[r["prompt"]] for r in prompts])
    _write_jsonl(out / "prompts_eval.jsonl", prompt_rows(n_eval))
    _write_jsonl(out / "pretrain.jsonl", [{"text": pretrain_text(rng)} for _ in range(n_pretrain)])
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def corpus(out_dir: str | Path) -> list[str]:
    """All text of the demo files, for training the tokenizer."""
    texts: list[str] = []
    out = Path(out_dir)
    # the single-turn rows only: the conversations repeat their texts, and the tokenizer stays what it was
    for r in json.loads((out / "sft_train.json").read_text(encoding="utf-8")):
        if "instruction" in r:
            texts += [r["instruction"], r["input"], r["output"]]
    for name in ["rm_train.jsonl", "pretrain.jsonl"]:
        for line in (out / name).read_text(encoding="utf-8").splitlines():
            values = list(json.loads(line).values())
            if all(isinstance(v, str) for v in values):
                texts += values
    return [t for t in texts if t]
