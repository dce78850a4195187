"""The hf generator backend: sampled log-probs, sampling controls, EOS, weight updates (no Ray)."""

from __future__ import annotations

import pytest
import torch

from coati_ray.data.formatting import render_prompt
from coati_ray.engines.generation import HFBackend, SamplingParams, WeightUpdate
from coati_ray.models.loading import load_causal_lm


@pytest.fixture(scope="module")
def backend(micro_model, tokenizer):
    torch.manual_seed(0)
    return HFBackend(load_causal_lm(micro_model), tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu"))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Tom has 3 apples and gets 4 more. How many?", "小明有5个苹果。", "Hi"]  # different lengths: left padding
    return [tokenizer(render_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]


def as_batch(prompts, out, pad):
    """The rollout layout: left-padded prompts then right-padded responses, with the action mask."""
    P, A = max(map(len, prompts)), max(len(g.token_ids) for g in out)
    seq = torch.full((len(prompts), P + A), pad)
    mask, amask, lp = torch.zeros_like(seq), torch.zeros(len(prompts), A), torch.zeros(len(prompts), A)
    for i, (p, g) in enumerate(zip(prompts, out)):
        seq[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        seq[i, P:P + len(g.token_ids)], mask[i, P:P + len(g.token_ids)] = torch.tensor(g.token_ids), 1
        amask[i, :len(g.token_ids)], lp[i, :len(g.log_probs)] = 1, torch.tensor(g.log_probs)
    return seq, mask, amask, lp, A


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sampled_log_probs_equal_a_full_forward_at_the_same_temperature(backend, prompts, tokenizer, temperature):
    out = backend.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, seed=3))
    seq, mask, amask, lp, A = as_batch(prompts, out, tokenizer.pad_token_id)
    scored = backend.log_probs(seq, mask, A, temperature)
    # KV-cached incremental decoding vs one full forward: float32 noise only.
    assert ((scored - lp) * amask).abs().max() < 1e-5
    assert (lp * amask).sum() < 0  # real log-probs, not zeros


def test_top_k_one_is_greedy_and_certain(backend, prompts, tokenizer):
    out = backend.generate(prompts, SamplingParams(top_k=1, max_new_tokens=8, seed=1))
    other = backend.generate(prompts, SamplingParams(top_k=1, max_new_tokens=8, seed=2))
    assert [g.token_ids for g in out] == [g.token_ids for g in other]  # no randomness left
    assert all(abs(x) < 1e-6 for g in out for x in g.log_probs)  # probability 1 under the truncated distribution
    seq, mask, amask, _, A = as_batch(prompts, out, tokenizer.pad_token_id)
    full = backend.log_probs(seq, mask, A)
    assert ((full * amask) < 0).any()  # ... but not under the untruncated policy


def test_top_p_log_probs_are_those_of_the_renormalised_nucleus(backend, prompts, tokenizer):
    out = backend.generate(prompts, SamplingParams(top_p=0.5, max_new_tokens=10, seed=4))
    seq, mask, amask, lp, A = as_batch(prompts, out, tokenizer.pad_token_id)
    full = backend.log_probs(seq, mask, A)
    # Renormalising over a nucleus raises every kept token's probability (or keeps it).
    assert (((lp - full) * amask) >= -1e-6).all()
    assert (((lp - full) * amask) > 1e-3).any()


def test_same_seed_same_rollout_and_other_seed_differs(backend, prompts):
    a = backend.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    b = backend.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    c = backend.generate(prompts, SamplingParams(max_new_tokens=10, seed=6))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def eos_loving_backend(micro_model, tokenizer) -> HFBackend:
    """A model whose EOS logit carries a large bias: most responses end with EOS within a few tokens."""
    model = load_causal_lm(micro_model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 8.0
    model.lm_head = head
    return HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu"))


def test_responses_stop_at_eos_and_keep_it(micro_model, tokenizer, prompts):
    be = eos_loving_backend(micro_model, tokenizer)
    out = be.generate(prompts, SamplingParams(max_new_tokens=10, seed=0))
    for g in out:
        assert g.finished and g.token_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in g.token_ids[:-1]
        assert len(g.log_probs) == len(g.token_ids)


def test_ignore_eos_samples_exactly_max_new_tokens_with_true_log_probs(micro_model, tokenizer, prompts):
    be = eos_loving_backend(micro_model, tokenizer)
    out = be.generate(prompts, SamplingParams(max_new_tokens=10, seed=0, ignore_eos=True))
    assert [len(g.token_ids) for g in out] == [10] * len(prompts)
    assert all(len(g.log_probs) == 10 and not g.finished for g in out)
    # EOS is still sampled (the bias makes it likely), it just ends nothing
    assert sum(g.token_ids[:-1].count(tokenizer.eos_token_id) for g in out) > 0
    # the recorded log-probs are the unmasked model's: a full forward over the sequence agrees
    seq, mask, amask, lp, A = as_batch(prompts, out, tokenizer.pad_token_id)
    assert ((be.log_probs(seq, mask, A) - lp) * amask).abs().max() < 1e-5


def test_unfinished_responses_are_cut_at_max_new_tokens(backend, prompts):
    out = backend.generate(prompts, SamplingParams(max_new_tokens=4, seed=0))
    assert all(len(g.token_ids) <= 4 for g in out)
    assert any(not g.finished and len(g.token_ids) == 4 for g in out)


def test_full_weight_update_makes_generator_match_the_source(micro_model, tokenizer, prompts):
    src = load_causal_lm(micro_model)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    be = HFBackend(load_causal_lm(micro_model), tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu"))
    ref = HFBackend(src, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.device("cpu"))
    params = SamplingParams(max_new_tokens=8, seed=9)
    assert [g.token_ids for g in be.generate(prompts, params)] != [g.token_ids for g in ref.generate(prompts, params)]
    be.load_weights(WeightUpdate(1, {k: v.clone() for k, v in src.state_dict().items()}))
    assert [g.token_ids for g in be.generate(prompts, params)] == [g.token_ids for g in ref.generate(prompts, params)]


def test_bad_weight_updates_are_refused_with_the_names(backend, micro_model):
    sd = load_causal_lm(micro_model).state_dict()
    with pytest.raises(ValueError, match="does not have"):
        backend.load_weights(WeightUpdate(1, {"no.such.weight": torch.zeros(1)}))
    partial = dict(list(sd.items())[:3])
    with pytest.raises(ValueError, match="lacks"):
        backend.load_weights(WeightUpdate(1, partial))  # a full update must carry every tensor
