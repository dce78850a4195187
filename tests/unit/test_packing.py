"""Padding-free packing (coati_ray/data/packing.py): the layout by hand, and SFT / RM losses and
gradients of a packed micro-batch against the padded one on a real micro llama."""

from __future__ import annotations

import pytest
import torch

from coati_ray.config import ModelArgs, RMArgs, SFTDataArgs
from coati_ray.data.packing import IGNORE_INDEX, can_pack, pack, pack_rows, padding_stats
from coati_ray.defaults import demo_file
from coati_ray.workers.tasks import RMTask, SFTTask


def test_rows_are_as_few_as_first_fit_needs_and_as_even_as_it_allows():
    # lengths 5, 3, 4, 2 in rows of 8: first-fit (longest first) needs 2 rows; 14 tokens in 2 rows
    # need a width of 7, at which 5 opens row 0, 4 opens row 1, 3 joins row 1, 2 joins row 0
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 3], [2, 1]]
    assert pack_rows([4, 4, 4], 16) == [[0, 1, 2]]  # one row: nothing to even out
    assert pack_rows([9, 1], 8) == [[0], [1]]  # a sequence over the budget gets its own row; nothing joins it
    assert pack_rows([], 8) == []


def test_padding_stats_by_hand():
    s = padding_stats([5, 3, 4, 2], 8)
    assert (s.real, s.padded, s.packed) == (14, 4 * 5, 2 * 7)
    assert s.share(s.padded) == pytest.approx(1 - 14 / 20)
    assert s.share(s.packed) == 0.0


def test_packed_layout_positions_mask_and_labels():
    seqs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    labels = [[-100, 12, 13], [21, 22], [-100, -100, 33, 34]]
    b = pack(seqs, pad_id=0, row_tokens=6, labels=labels)
    # 9 tokens need 2 rows of <= 6; at width 5: seq 2 (4) opens row 0, seq 0 (3) opens row 1, seq 1 joins it
    assert b["input_ids"].tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert b["tokens_mask"].tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert b["seq_row"].tolist() == [1, 1, 0] and b["seq_end"].tolist() == [2, 4, 3]
    # each sequence's first label is ignored (nothing before it in its sequence predicts it), pad ignored
    assert b["labels"].tolist() == [[-100, -100, 33, 34, -100], [-100, 12, 13, -100, 22]]
    m = b["attention_mask"]
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    assert m[1, 0, 4].tolist() == [False, False, False, True, True]  # seq 1's last token sees seq 1 only
    assert m[0, 0, 3].tolist() == [True, True, True, True, False]
    assert m[0, 0, 4].tolist() == [False, False, False, False, True]  # the pad sees itself only
    assert all(m[r, 0].diagonal().all() for r in range(2))  # nobody's row is empty


def test_only_families_that_take_positions_and_4d_masks_pack(micro_model):
    from coati_ray.data.packing import model_can_pack
    from coati_ray.models.loading import load_causal_lm

    assert can_pack("llama") and can_pack("qwen2")
    assert not can_pack("gpt2") and not can_pack("bloom") and not can_pack(None)
    model = load_causal_lm(micro_model)
    assert model_can_pack(model)  # a llama with SDPA attention
    model.config._attn_implementation = "eager"  # eager attention adds the mask: a boolean one would be wrong
    assert not model_can_pack(model)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def dialogue_rows():
    """Demo SFT rows of very different lengths: single-turn instructions and multi-turn dialogues."""
    from coati_ray.data.loading import load_rows, sft_schema

    rows = list(load_rows(demo_file("sft_train.json"), sft_schema(SFTDataArgs().keys()), False).dataset)
    return [r for r in rows if not r["messages"]][:5] + [r for r in rows if r["messages"]][:3]


def test_sft_loss_and_gradients_of_a_packed_batch_equal_the_padded_batch(micro_model, dialogue_rows):
    task = SFTTask(micro_model, ModelArgs(), SFTDataArgs(max_len=256), demo_file("sft_train.json"), None, 0)
    assert task.packing  # the micro preset is a llama
    items, _ = task._tokenize_all(dialogue_rows)
    lengths = [len(x.input_ids) for x in items]
    assert max(lengths) > 2 * min(lengths)  # padding would matter
    packed = task.collate(items)
    task.packing = False
    padded = task.collate(items)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert task.count(packed) == task.count(padded)  # the same predicted tokens
    model = task.build_model()
    loss_padded, _ = task.loss(model, padded)
    loss_padded.backward()
    g_padded = _grads(model)
    model.zero_grad()
    loss_packed, _ = task.loss(model, packed)
    loss_packed.backward()
    g_packed = _grads(model)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    assert torch.allclose(g_packed, g_padded, rtol=1e-4, atol=1e-6)


def test_rm_rewards_of_a_packed_batch_equal_the_padded_batch(micro_model, tokenizer):
    task = RMTask(micro_model, ModelArgs(), SFTDataArgs(max_len=256), demo_file("sft_train.json"), None, 0,
                  rm_args=RMArgs())
    assert task.packing
    rows = [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "It is 6, I think, or maybe 7."},
            {"prompt": "A long question " * 12, "chosen": "Fine. " * 9, "rejected": "No."}]
    items = [task.tokenize(r) for r in rows]
    packed = task.collate(items)
    task.packing = False
    padded = task.collate(items)
    assert task.count(packed) == task.count(padded) == 2
    model = task.build_model().eval()
    with torch.no_grad():
        c1, r1 = task._rewards(model, padded)
        c2, r2 = task._rewards(model, packed)
    assert torch.allclose(c1, c2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    assert not torch.allclose(c1, r1)  # different sequences, different rewards


def test_gpt2_pads_instead(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)
    GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    task = SFTTask(str(tmp_path), ModelArgs(), SFTDataArgs(), demo_file("sft_train.json"), None, 0)
    assert not task.packing
    assert "not packed" in task.padding_report([])
    assert IGNORE_INDEX == -100


def _rollout_batch(tokenizer):
    """A PPO-shaped batch: left-padded prompts of different lengths, right-padded responses."""
    prompts, responses = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19]], [[20, 21, 22], [23], [24, 25]]
    P, A = max(map(len, prompts)), max(map(len, responses))
    seq = torch.full((3, P + A), tokenizer.pad_token_id)
    mask = torch.zeros_like(seq)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        seq[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r), 1
    return seq, mask, A


def test_padded_batches_run_packed_give_the_same_log_probs_values_and_gradients(micro_model, tokenizer):
    from coati_ray.data.packing import pack_padded
    from coati_ray.models.heads import action_log_probs, set_packing, token_values
    from coati_ray.models.loading import load_causal_lm, load_value_model

    seq, mask, A = _rollout_batch(tokenizer)
    packed = pack_padded(seq, mask)
    assert packed is not None and packed.batch["input_ids"].numel() < seq.numel()
    assert pack_padded(seq[:1, -4:], mask[:1, -4:]) is None  # nothing to save: the padded forward runs
    policy = load_causal_lm(micro_model)
    action = mask[:, -A:].float()
    lp_padded = action_log_probs(policy, seq, mask, A)
    (lp_padded * action).sum().backward()
    g_padded = _grads(policy)
    policy.zero_grad()
    set_packing(policy, True)
    assert policy._coati_pack
    lp_packed = action_log_probs(policy, seq, mask, A)
    (lp_packed * action).sum().backward()
    assert torch.allclose(lp_packed * action, lp_padded * action, atol=1e-5)
    assert torch.allclose(_grads(policy), g_padded, rtol=1e-4, atol=1e-6)
    critic = load_value_model(micro_model, pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():
        v_padded = token_values(critic, seq, mask)
        set_packing(critic, True)
        v_packed = token_values(critic, seq, mask)
    assert torch.allclose(v_packed * mask, v_padded * mask, atol=1e-5)
    assert (v_packed[mask == 0] == 0).all()  # the padding's outputs are zeros, not another row's
