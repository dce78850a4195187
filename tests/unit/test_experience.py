"""Experience: the batch type. Joining batches of different prompt/response widths, row selection."""

import pytest
import torch

from coati_ray.experience import Experience

PAD = 99


def _experience(prompts, responses, P, A, base_id=0, version=0, with_values=False, with_raw=False):
    """Rows laid out as [left pad | prompt | response | right pad], widths P and A."""
    rows, attn, amask = [], [], []
    for p, r in zip(prompts, responses):
        rows.append([PAD] * (P - len(p)) + p + r + [PAD] * (A - len(r)))
        attn.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (A - len(r)))
        amask.append([1.0] * len(r) + [0.0] * (A - len(r)))
    B = len(prompts)
    action_mask = torch.tensor(amask)
    # Distinct, recognisable per-token values: -(row + 1 + col / 10) on real tokens, 0 on padding.
    lp = torch.tensor([[-(base_id + b + 1 + c / 10) for c in range(A)] for b in range(B)]) * action_mask
    return Experience(
        sequences=torch.tensor(rows, dtype=torch.long),
        attention_mask=torch.tensor(attn, dtype=torch.long),
        action_mask=action_mask,
        log_probs=lp,
        score=torch.arange(B, dtype=torch.float32) + base_id,
        sample_ids=torch.arange(B) + base_id,
        versions=torch.full((B,), version),
        prompt_index=torch.arange(B) * 10 + base_id,
        values=(lp * 2) if with_values else None,
        raw_score=(torch.arange(B, dtype=torch.float32) + 100 + base_id) if with_raw else None,
    )


def _batch1(**kw):
    # P = 3, A = 2
    return _experience([[11, 12], [21, 22, 23]], [[13], [24, 25]], P=3, A=2, base_id=0, version=1, **kw)


def _batch2(**kw):
    # P = 5, A = 4
    return _experience([[31, 32, 33, 34]], [[35, 36, 37]], P=5, A=4, base_id=2, version=2, **kw)


def test_helper_builds_the_documented_layout():
    e = _batch1()
    assert e.sequences.tolist() == [[PAD, 11, 12, 13, PAD], [21, 22, 23, 24, 25]]
    assert e.attention_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert e.action_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_size_and_num_actions():
    e = _batch2()
    assert e.size == 1
    assert e.num_actions == 4
    e1 = _batch1()
    assert (e1.size, e1.num_actions) == (2, 2)


def test_concat_repads_prompts_left_and_responses_right():
    out = Experience.concat([_batch1(), _batch2()], pad_token_id=PAD)
    # joined widths: P = max(3, 5) = 5, A = max(2, 4) = 4, T = 9
    assert out.sequences.tolist() == [
        [PAD, PAD, PAD, 11, 12, 13, PAD, PAD, PAD],
        [PAD, PAD, 21, 22, 23, 24, 25, PAD, PAD],
        [PAD, 31, 32, 33, 34, 35, 36, 37, PAD],
    ]
    assert out.attention_mask.tolist() == [
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 0],
    ]
    assert out.sequences.dtype == torch.long and out.attention_mask.dtype == torch.long
    assert (out.size, out.num_actions) == (3, 4)


def test_concat_prompt_ends_at_column_p_minus_one_and_response_starts_at_p():
    out = Experience.concat([_batch1(), _batch2()], pad_token_id=PAD)
    P = out.sequences.shape[1] - out.num_actions
    assert P == 5
    assert out.sequences[:, P - 1].tolist() == [12, 23, 34]  # last prompt token of every row
    assert out.sequences[:, P].tolist() == [13, 24, 35]  # first response token of every row
    # the action mask lines up with the response part of attention_mask
    assert out.attention_mask[:, P:].float().tolist() == out.action_mask.tolist()


def test_concat_when_the_narrower_prompt_has_the_wider_response():
    x = _experience([[1]], [[2, 3, 4, 5, 6]], P=2, A=5)  # T = 7
    y = _experience([[7, 8, 9, 10]], [[11]], P=4, A=1)  # T = 5
    out = Experience.concat([x, y], pad_token_id=PAD)
    # P = 4, A = 5, T = 9: wider than either part
    assert out.sequences.tolist() == [
        [PAD, PAD, PAD, 1, 2, 3, 4, 5, 6],
        [7, 8, 9, 10, 11, PAD, PAD, PAD, PAD],
    ]
    assert out.action_mask.tolist() == [[1.0] * 5, [1.0, 0.0, 0.0, 0.0, 0.0]]


def test_concat_uses_the_given_pad_token_for_new_padding():
    out = Experience.concat([_batch1(), _batch2()], pad_token_id=7)
    # new left padding of row 1 (2 columns) and new right padding (2 columns) use 7;
    # the original PAD inside the batch stays as it was.
    assert out.sequences[1].tolist() == [7, 7, 21, 22, 23, 24, 25, 7, 7]
    assert out.sequences[0].tolist() == [7, 7, PAD, 11, 12, 13, PAD, 7, 7]


def test_concat_zero_pads_action_fields_on_the_right():
    b1, b2 = _batch1(with_values=True), _batch2(with_values=True)
    out = Experience.concat([b1, b2], pad_token_id=PAD)
    assert out.action_mask.tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    expected_lp = torch.tensor([
        [-1.0, 0.0, 0.0, 0.0],
        [-2.0, -2.1, 0.0, 0.0],
        [-3.0, -3.1, -3.2, 0.0],
    ])
    torch.testing.assert_close(out.log_probs, expected_lp)
    torch.testing.assert_close(out.values, expected_lp * 2)


def test_concat_joins_per_sample_fields_in_order():
    out = Experience.concat([_batch1(with_raw=True), _batch2(with_raw=True)], pad_token_id=PAD)
    assert out.score.tolist() == [0.0, 1.0, 2.0]
    assert out.sample_ids.tolist() == [0, 1, 2]
    assert out.versions.tolist() == [1, 1, 2]
    assert out.prompt_index.tolist() == [0, 10, 2]
    assert out.raw_score.tolist() == [100.0, 101.0, 102.0]


def test_concat_keeps_missing_fields_none():
    out = Experience.concat([_batch1(), _batch2()], pad_token_id=PAD)
    for name in ("ref_log_probs", "kl", "values", "advantages", "returns", "raw_score"):
        assert getattr(out, name) is None


@pytest.mark.parametrize("field", ["values", "raw_score"])
def test_concat_of_present_and_missing_field_raises(field):
    kw = {"with_values": True} if field == "values" else {"with_raw": True}
    with pytest.raises(ValueError, match=field):
        Experience.concat([_batch1(**kw), _batch2()], pad_token_id=PAD)
    with pytest.raises(ValueError, match=field):
        Experience.concat([_batch1(), _batch2(**kw)], pad_token_id=PAD)


def test_concat_of_one_part_returns_it():
    e = _batch1()
    assert Experience.concat([e], pad_token_id=PAD) is e


def test_concat_of_equal_widths_is_plain_cat():
    a, b = _batch1(), _batch1()
    out = Experience.concat([a, b], pad_token_id=PAD)
    assert torch.equal(out.sequences, torch.cat([a.sequences, b.sequences]))
    assert torch.equal(out.log_probs, torch.cat([a.log_probs, b.log_probs]))


def test_select_picks_rows_in_the_given_order_and_keeps_widths():
    e = Experience.concat([_batch1(with_values=True), _batch2(with_values=True)], pad_token_id=PAD)
    s = e.select([2, 0])
    assert (s.size, s.num_actions, s.sequences.shape[1]) == (2, 4, 9)
    assert torch.equal(s.sequences, e.sequences[[2, 0]])
    assert torch.equal(s.attention_mask, e.attention_mask[[2, 0]])
    assert torch.equal(s.log_probs, e.log_probs[[2, 0]])
    assert torch.equal(s.values, e.values[[2, 0]])
    assert s.sample_ids.tolist() == [2, 0]
    assert s.kl is None and s.raw_score is None


def test_select_accepts_a_tensor_index():
    e = _batch1()
    s = e.select(torch.tensor([1]))
    assert s.sample_ids.tolist() == [1]
    assert s.sequences.tolist() == [[21, 22, 23, 24, 25]]


def test_select_does_not_modify_the_original():
    e = _batch1()
    e.select([1])
    assert e.size == 2 and e.sample_ids.tolist() == [0, 1]


def test_split_keeps_row_order_and_shapes():
    e = Experience.concat([_batch1(), _batch2(), _batch1(), _batch2()], pad_token_id=PAD)
    assert e.size == 6
    parts = e.split(4)
    assert [p.size for p in parts] == [4, 2]
    assert all(p.num_actions == 4 and p.sequences.shape[1] == 9 for p in parts)
    assert [i for p in parts for i in p.sample_ids.tolist()] == e.sample_ids.tolist()
    joined = Experience.concat(parts, pad_token_id=PAD)
    assert torch.equal(joined.sequences, e.sequences)
    assert torch.equal(joined.log_probs, e.log_probs)


def test_split_larger_than_batch_gives_one_part():
    e = _batch1()
    parts = e.split(10)
    assert len(parts) == 1 and torch.equal(parts[0].sequences, e.sequences)


def test_to_moves_every_tensor_and_keeps_none():
    e = _batch1(with_values=True)
    m = e.to("meta")
    for name in ("sequences", "attention_mask", "action_mask", "log_probs", "score", "sample_ids", "versions",
                 "prompt_index", "values"):
        t = getattr(m, name)
        assert t.device.type == "meta"
        assert t.shape == getattr(e, name).shape and t.dtype == getattr(e, name).dtype
    assert m.kl is None and m.raw_score is None
    assert e.sequences.device.type == "cpu"  # the original is untouched
