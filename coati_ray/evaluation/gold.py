"""Gold score of a policy on held-out demo prompts: greedy answers scored by `demo.gold_score`
(and, for diagnosis, by `demo.equation_score`: the arithmetic whatever the answer style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coati_ray.data.demo import equation_score, gold_score
from coati_ray.data.formatting import render_prompt


@dataclass
class GoldResult:
    score: float  # mean gold score in [0, 1]
    n: int
    examples: list[tuple[str, str, float]]  # (prompt, response, score), the first few
    arithmetic: float = 0.0  # mean equation_score: right sums, stated as the final answer or not


@torch.no_grad()
def evaluate_gold(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 32,
                  n_examples: int = 3) -> GoldResult:
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    scores, examples, arithmetic = [], [], []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer([render_prompt(tokenizer, p) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for p, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                response = tokenizer.decode(seq, skip_special_tokens=True)
                s = gold_score(p, response)
                scores.append(s)
                arithmetic.append(equation_score(p, response))
                if len(examples) < n_examples:
                    examples.append((p, response, s))
    finally:
        tokenizer.padding_side = old_side
    n = max(len(scores), 1)
    return GoldResult(sum(scores) / n, len(scores), examples, sum(arithmetic) / n)
