"""New estimators and objectives: REINFORCE++, Dr. GRPO, clip-higher, GSPO, CISPO, aggregation, TIS, DAPO.

As in test_algos.py: expected numbers are plain float arithmetic with the working in comments, never
a call to the function under test; the loop references are naive per-row, per-token Python written
from the papers' formulas.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from coati_ray.algos import NEEDS_CRITIC
from coati_ray.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    group_centered_scores,
    masked_moments,
    masked_whiten,
    whiten_with_moments,
)
from coati_ray.algos.losses import policy_loss
from coati_ray.algos.objectives import (
    AGG_MODES,
    aggregate,
    aggregate_count,
    cispo_loss,
    clipped_policy_loss,
    groups_with_signal,
    gspo_loss,
    mismatch_metrics,
    overlong_penalty,
    sequence_log_ratio,
    tis_weights,
)

ATOL = dict(atol=1e-5, rtol=1e-5)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def L(x):
    return x.tolist()


def _random_batch(seed, B=8, A=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, A + 1, (B,), generator=g)
    mask = (torch.arange(A).unsqueeze(0) < lengths.unsqueeze(1)).float()

    def rand():  # garbage on padding too: every function must ignore it
        return torch.randn(B, A, generator=g) * 2

    return dict(mask=mask, lengths=[int(n) for n in lengths], kl=rand(), score=torch.randn(B, generator=g) * 3,
                log_probs=rand() * 0.3 - 1.0, old_log_probs=rand() * 0.3 - 1.0, advantages=rand(), loss=rand(),
                seq_adv=torch.randn(B, generator=g))


# ----------------------------------------------------------------------------------------------
# Advantage estimators: hand values
# ----------------------------------------------------------------------------------------------

def test_group_centered_scores_by_hand():
    # groups (1, 3): mean 2; (0, 10): mean 5; no division by the std
    assert_close(group_centered_scores(t([1.0, 3.0, 0.0, 10.0]), 2), t([-1.0, 1.0, -5.0, 5.0]))
    # group of four (1, 2, 3, 6): mean 3
    assert_close(group_centered_scores(t([1.0, 2.0, 3.0, 6.0]), 4), t([-2.0, -1.0, 0.0, 3.0]))


def test_dr_grpo_estimator_by_hand():
    score = t([1.0, 3.0])  # one group of two: centred (-1, 1)
    kl = t([[0.1, 0.2, 9.0], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # coef 0.5: row 0 rewards [-0.05, -0.1 - 1, 0] -> returns (gamma 1) [-1.15, -1.1, 0]
    #           row 1 rewards [-0.2, -0.25, -0.3 + 1] -> returns [0.25, 0.45, 0.7]
    adv, ret = ADVANTAGE_ESTIMATORS["dr_grpo"](score, kl, mask, 0.5, None, 2, 1.0, 0.95)
    expected = [[-1.15, -1.1, 0.0], [0.25, 0.45, 0.7]]
    assert_close(adv, t(expected), **ATOL)
    assert_close(ret, t(expected), **ATOL)


def _whiten3(a, b, c):
    # unbiased whitening of three numbers, written out
    m = (a + b + c) / 3
    std = math.sqrt(((a - m) ** 2 + (b - m) ** 2 + (c - m) ** 2) / 2 + 1e-8)
    return (a - m) / std, (b - m) / std, (c - m) / std


RPP_KL = [[0.2, 0.4], [0.6, 9.0]]
RPP_MASK = [[1, 1], [1, 0]]


def test_reinforce_pp_by_hand():
    # coef 0.5 -> penalties [-0.1, -0.2] and [-0.3]; scores (2, -1); gamma 0.5
    # row 0 rewards [-0.1, 2 - 0.2 = 1.8]: G1 = 1.8, G0 = -0.1 + 0.5 * 1.8 = 0.8
    # row 1 rewards [-0.3 - 1 = -1.3]:     G0 = -1.3
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"](t([2.0, -1.0]), t(RPP_KL), t(RPP_MASK), 0.5, None, 1, 0.5)
    assert_close(ret, t([[0.8, 1.8], [-1.3, 0.0]]), **ATOL)
    a, b, c = _whiten3(0.8, 1.8, -1.3)  # whitened over all three real tokens of the batch
    assert_close(adv, t([[a, b], [c, 0.0]]), **ATOL)


def test_reinforce_pp_baseline_by_hand():
    # one group of two: scores (2, -1), mean 0.5 -> centred (1.5, -1.5); coef 0.5, gamma 0.5
    # row 0 rewards [-0.1, 1.5 - 0.2 = 1.3]: G1 = 1.3, G0 = -0.1 + 0.65 = 0.55
    # row 1 rewards [-0.3 - 1.5 = -1.8]:     G0 = -1.8
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](t([2.0, -1.0]), t(RPP_KL), t(RPP_MASK), 0.5, None, 2,
                                                             0.5)
    assert_close(ret, t([[0.55, 1.3], [-1.8, 0.0]]), **ATOL)
    a, b, c = _whiten3(0.55, 1.3, -1.8)
    assert_close(adv, t([[a, b], [c, 0.0]]), **ATOL)


def test_new_estimators_need_no_critic():
    for name in ("dr_grpo", "reinforce_pp", "reinforce_pp_baseline"):
        assert NEEDS_CRITIC[name] is False
    assert set(NEEDS_CRITIC) == set(ADVANTAGE_ESTIMATORS)


# ----------------------------------------------------------------------------------------------
# Advantage estimators: loop references
# ----------------------------------------------------------------------------------------------

def loop_returns(score, kl, lengths, coef, gamma):
    out = [[0.0] * len(k) for k in kl]
    for b in range(len(kl)):
        r = [-coef * kl[b][i] for i in range(lengths[b])]
        r[-1] += score[b]
        for i in range(lengths[b]):
            out[b][i] = sum(gamma ** (k - i) * r[k] for k in range(i, lengths[b]))
    return out


def loop_centre(score, n):
    out = []
    for s in range(0, len(score), n):
        grp = score[s:s + n]
        out += [x - sum(grp) / n for x in grp]
    return out


def loop_whiten(x, lengths):
    vals = [x[b][i] for b in range(len(x)) for i in range(lengths[b])]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) + 1e-8)
    return [[(x[b][i] - mean) / std if i < lengths[b] else 0.0 for i in range(len(x[b]))] for b in range(len(x))]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["dr_grpo", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_new_estimators_match_loop(seed, name, gamma):
    d = _random_batch(seed)
    n, coef = 4, 0.05
    adv, ret = ADVANTAGE_ESTIMATORS[name](d["score"], d["kl"], d["mask"], coef, values=None, n_samples_per_prompt=n,
                                          gamma=gamma, lam=0.95)
    score = L(d["score"]) if name == "reinforce_pp" else loop_centre(L(d["score"]), n)
    ref_ret = loop_returns(score, L(d["kl"]), d["lengths"], coef, gamma)
    ref_adv = ref_ret if name == "dr_grpo" else loop_whiten(ref_ret, d["lengths"])
    assert_close(ret, t(ref_ret), **ATOL)
    assert_close(adv, t(ref_adv), **ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_whitening_chunks_with_summed_moments_equals_whitening_the_whole(seed):
    d = _random_batch(seed)
    x, mask = d["advantages"], d["mask"]
    chunks = [slice(0, 3), slice(3, 8)]
    total = sum(masked_moments(x[c], mask[c]) for c in chunks)
    out = torch.cat([whiten_with_moments(x[c], mask[c], total) for c in chunks])
    assert_close(out, masked_whiten(x, mask), **ATOL)
    # and the whole-batch REINFORCE++ advantages are recovered from per-chunk returns
    ests = [ADVANTAGE_ESTIMATORS["reinforce_pp"](d["score"][c], d["kl"][c], mask[c], 0.1) for c in chunks]
    total = sum(masked_moments(ret, mask[c]) for (_, ret), c in zip(ests, chunks))
    glob = torch.cat([whiten_with_moments(ret, mask[c], total) for (_, ret), c in zip(ests, chunks)])
    whole, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](d["score"], d["kl"], mask, 0.1)
    assert_close(glob, whole, **ATOL)


def test_masked_moments_by_hand():
    x = t([[1.0, 2.0, 50.0], [3.0, 60.0, 70.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # count 3, sum 1 + 2 + 3 = 6, squares 1 + 4 + 9 = 14
    assert masked_moments(x, mask).tolist() == [3.0, 6.0, 14.0]


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

AGG_LOSS = [[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [5.0, 6.0, 100.0, 100.0]]
AGG_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_aggregate_by_hand():
    loss, mask = t(AGG_LOSS), t(AGG_MASK)
    # token_mean: (1 + 2 + 3 + 4 + 5 + 6) / 6 tokens
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(21.0)
    assert aggregate_count(mask, "token_mean").item() == 6.0
    # seq_mean_token_mean: sequence means 2, 4, 5.5 -> sum 11.5 over 3 sequences
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(11.5)
    assert aggregate_count(mask, "seq_mean_token_mean").item() == 3.0
    # seq_mean_token_sum_norm, norm 4: sums 6, 4, 11 -> 1.5 + 1 + 2.75 = 5.25 over 3 sequences
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm_len=4).item() == pytest.approx(5.25)
    assert aggregate_count(mask, "seq_mean_token_sum_norm").item() == 3.0


def test_aggregate_rejects_bad_modes_and_missing_norm():
    loss, mask = t(AGG_LOSS), t(AGG_MASK)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError):
        aggregate(loss, mask, "token_sum")
    with pytest.raises(ValueError):
        aggregate_count(mask, "token_sum")


def test_empty_rows_count_nowhere():
    loss = t([[1.0, 3.0], [9.0, 9.0]])
    mask = t([[1, 1], [0, 0]])  # a padding row
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == 2.0
    assert aggregate_count(mask, "seq_mean_token_mean").item() == 1.0


def loop_aggregate(loss, lengths, mode, norm_len=None):
    if mode == "token_mean":
        toks = [loss[b][i] for b in range(len(loss)) for i in range(lengths[b])]
        return sum(toks) / len(toks)
    per = []
    for b in range(len(loss)):
        s = sum(loss[b][:lengths[b]])
        per.append(s / lengths[b] if mode == "seq_mean_token_mean" else s / norm_len)
    return sum(per) / len(per)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("splits", [[8], [3, 5], [1, 2, 5], [1] * 8])
def test_micro_batch_sums_over_global_counts_equal_the_whole_batch(seed, mode, splits):
    d = _random_batch(seed)
    norm_len = 16.0
    whole_leaf = d["loss"].clone().requires_grad_(True)
    whole = aggregate(whole_leaf, d["mask"], mode, norm_len) / aggregate_count(d["mask"], mode)
    whole.backward()
    assert whole.item() == pytest.approx(loop_aggregate(L(d["loss"]), d["lengths"], mode, norm_len), abs=1e-5)

    parts_leaf = d["loss"].clone().requires_grad_(True)
    nums, counts, start = [], [], 0
    for size in splits:  # each micro-batch is cut to its own longest row, as a real one is
        rows = slice(start, start + size)
        width = int(d["mask"][rows].sum(1).max())
        nums.append(aggregate(parts_leaf[rows, :width], d["mask"][rows, :width], mode, norm_len))
        counts.append(aggregate_count(d["mask"][rows, :width], mode))
        start += size
    total = sum(nums) / sum(counts)
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-5)
    assert_close(parts_leaf.grad, whole_leaf.grad, **ATOL)


# ----------------------------------------------------------------------------------------------
# Clip-higher (DAPO eq. 10) and the unchanged PPO loss
# ----------------------------------------------------------------------------------------------

CH_RATIOS = [[1.25, 0.75, 1.5], [0.7, 1.25, 1.1]]
CH_ADVS = [[1.0, -1.0, 2.0], [-2.0, -1.0, 3.0]]
CH_MASK = [[1, 1, 1], [1, 1, 0]]
CH_OLD = [[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]]


def _ch_inputs(requires_grad=False):
    old = t(CH_OLD)
    lp = (old + torch.log(t(CH_RATIOS))).detach().requires_grad_(requires_grad)
    return lp, old, t(CH_ADVS), t(CH_MASK)


def test_clip_higher_by_hand():
    out = clipped_policy_loss(*_ch_inputs(), eps_clip_low=0.2, eps_clip_high=0.3)
    # range [0.8, 1.3]
    # (1.25, +1): 1.25 inside                -> -1.25, not clipped
    # (0.75, -1): min(-0.75, 0.8 * -1 = -0.8) -> 0.8, clipped
    # (1.5,  +2): min(3.0, 1.3 * 2 = 2.6)     -> -2.6, clipped
    # (0.7,  -2): min(-1.4, 0.8 * -2 = -1.6)  -> 1.6, clipped
    # (1.25, -1): 1.25 inside                -> 1.25, not clipped
    assert out.loss_sum.item() == pytest.approx(-1.25 + 0.8 - 2.6 + 1.6 + 1.25, abs=1e-5)
    assert out.clipped.item() == 3.0
    kl = sum(r - 1 - math.log(r) for r in (1.25, 0.75, 1.5, 0.7, 1.25))
    assert out.approx_kl_sum.item() == pytest.approx(kl, abs=1e-5)


def test_symmetric_clip_by_hand_clips_the_first_token_too():
    out = clipped_policy_loss(*_ch_inputs(), eps_clip=0.2)
    # range [0.8, 1.2]: (1.25, +1) -> min(1.25, 1.2) -> -1.2, clipped; (1.5, +2) -> -2.4, clipped;
    # (1.25, -1) -> min(-1.25, -1.2) = -1.25 -> 1.25, not clipped; the rest as with clip-higher
    assert out.loss_sum.item() == pytest.approx(-1.2 + 0.8 - 2.4 + 1.6 + 1.25, abs=1e-5)
    assert out.clipped.item() == 4.0


def test_clip_higher_gradient_by_hand():
    lp, old, adv, mask = _ch_inputs(requires_grad=True)
    clipped_policy_loss(lp, old, adv, mask, eps_clip_low=0.2, eps_clip_high=0.3).loss_sum.backward()
    # d(-r A)/d log pi = -r A on the two unclipped tokens, 0 elsewhere
    assert_close(lp.grad, t([[-1.25 * 1.0, 0.0, 0.0], [0.0, -1.25 * -1.0, 0.0]]), **ATOL)


def test_clip_higher_with_tis_weights_and_sequence_mean():
    lp, old, adv, mask = _ch_inputs()
    w = t([[2.0, 1.0, 0.5], [1.0, 3.0, 7.0]])
    out = clipped_policy_loss(lp, old, adv, mask, eps_clip_low=0.2, eps_clip_high=0.3, weights=w)
    # per-token losses above times w: -1.25*2 + 0.8*1 - 2.6*0.5 + 1.6*1 + 1.25*3 (padding weight ignored)
    assert out.loss_sum.item() == pytest.approx(-2.5 + 0.8 - 1.3 + 1.6 + 3.75, abs=1e-5)
    out = clipped_policy_loss(lp, old, adv, mask, eps_clip_low=0.2, eps_clip_high=0.3, agg="seq_mean_token_mean")
    # row means (-1.25 + 0.8 - 2.6) / 3 and (1.6 + 1.25) / 2
    assert out.loss_sum.item() == pytest.approx(-3.05 / 3 + 2.85 / 2, abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_equal_low_and_high_give_exactly_the_old_policy_loss(seed, eps):
    d = _random_batch(seed)
    lp1 = d["log_probs"].clone().requires_grad_(True)
    lp2 = d["log_probs"].clone().requires_grad_(True)
    old = policy_loss(lp1, d["old_log_probs"], d["advantages"], d["mask"], eps)
    new = clipped_policy_loss(lp2, d["old_log_probs"], d["advantages"], d["mask"], eps, eps_clip_low=eps,
                              eps_clip_high=eps)
    assert torch.equal(old.loss_sum, new.loss_sum)
    assert torch.equal(old.clipped, new.clipped)
    assert torch.equal(old.approx_kl_sum, new.approx_kl_sum)
    old.loss_sum.backward()
    new.loss_sum.backward()
    assert torch.equal(lp1.grad, lp2.grad)
    default = clipped_policy_loss(d["log_probs"], d["old_log_probs"], d["advantages"], d["mask"], eps)
    assert torch.equal(default.loss_sum, old.loss_sum.detach())


def loop_clip_higher(lp, old, adv, lengths, lo, hi):
    loss, clipped = 0.0, 0
    for b in range(len(lp)):
        for i in range(lengths[b]):
            r = math.exp(lp[b][i] - old[b][i])
            s1, s2 = r * adv[b][i], min(max(r, 1 - lo), 1 + hi) * adv[b][i]
            loss += -min(s1, s2)
            clipped += s2 < s1
    return loss, clipped


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lo,hi", [(0.2, 0.28), (0.1, 0.3), (0.3, 0.1)])
def test_clip_higher_matches_loop(seed, lo, hi):
    d = _random_batch(seed)
    out = clipped_policy_loss(d["log_probs"], d["old_log_probs"], d["advantages"], d["mask"], eps_clip_low=lo,
                              eps_clip_high=hi)
    loss, clipped = loop_clip_higher(L(d["log_probs"]), L(d["old_log_probs"]), L(d["advantages"]), d["lengths"],
                                     lo, hi)
    assert clipped > 0
    assert out.loss_sum.item() == pytest.approx(loss, abs=1e-4)
    assert out.clipped.item() == clipped


# ----------------------------------------------------------------------------------------------
# GSPO
# ----------------------------------------------------------------------------------------------

GS_OLD = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]]
GS_LOG_RATIO = [[0.1, -0.1, 0.3], [0.5, 0.3, 7.0]]  # the 7.0 is padding
GS_MASK = [[1, 1, 1], [1, 1, 0]]
S0, S1 = math.exp(0.3 / 3), math.exp(0.8 / 2)  # geometric-mean ratios e^0.1 = 1.1052, e^0.4 = 1.4918


def _gs_inputs():
    old = t(GS_OLD)
    return (old + t(GS_LOG_RATIO)).requires_grad_(True), old, t(GS_MASK)


def test_sequence_log_ratio_by_hand():
    lp, old, mask = _gs_inputs()
    assert_close(sequence_log_ratio(lp, old, mask), t([0.1, 0.4]), **ATOL)


def test_gspo_by_hand_positive_advantages_clip_the_second_sequence():
    lp, old, mask = _gs_inputs()
    out = gspo_loss(lp, old, t([1.0, 2.0]), mask, eps_low=0.2, eps_high=0.2)
    # seq 0: s = 1.1052 inside [0.8, 1.2] -> L0 = -1.1052
    # seq 1: min(1.4918 * 2, 1.2 * 2 = 2.4) -> L1 = -2.4, clipped (its 2 tokens)
    assert out.loss_sum.item() == pytest.approx(-S0 - 2.4, abs=1e-5)  # sum of sequence losses
    assert out.clipped.item() == 2.0
    out.loss_sum.backward()
    # dL0/d log pi_t = -A0 s0 / |y0| on each of its 3 tokens; the clipped sequence gets 0
    assert_close(lp.grad, t([[-S0 / 3] * 3, [0.0, 0.0, 0.0]]), **ATOL)


def test_gspo_by_hand_negative_advantage_is_not_clipped_above():
    lp, old, mask = _gs_inputs()
    out = gspo_loss(lp, old, t([1.0, -2.0]), mask, eps_low=0.2, eps_high=0.2)
    # seq 1: min(-2 * 1.4918, -2 * 1.2) = -2.9837 -> L1 = +2.9837, the unclipped term
    assert out.loss_sum.item() == pytest.approx(-S0 + 2 * S1, abs=1e-5)
    assert out.clipped.item() == 0.0
    out.loss_sum.backward()
    # seq 1: -A1 s1 / 2 = 2 * 1.4918 / 2 per token
    assert_close(lp.grad, t([[-S0 / 3] * 3, [S1, S1, 0.0]]), **ATOL)


def test_gspo_token_level_uses_per_token_advantages_in_the_gradient():
    lp, old, mask = _gs_inputs()
    adv = t([[1.0, 2.0, 3.0], [-2.0, -2.0, 0.0]])
    out = gspo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, token_level=True)
    # every s_it has the value s_i; seq 0 inside the range; seq 1 has A < 0 so the unclipped term is active
    # value: mean_t(-s0 A_t) = -s0 * 2 for seq 0; -s1 * -2 for seq 1
    assert out.loss_sum.item() == pytest.approx(-S0 * 2.0 + 2.0 * S1, abs=1e-5)
    out.loss_sum.backward()
    # d/d log pi_t of mean_t(-s_it A_t) = -A_t s_i / |y_i|
    assert_close(lp.grad, t([[-1 * S0 / 3, -2 * S0 / 3, -3 * S0 / 3], [2 * S1 / 2, 2 * S1 / 2, 0.0]]), **ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_gspo_token_equals_gspo_in_value_and_gradient_for_constant_advantages(seed):
    d = _random_batch(seed)
    adv_seq = d["seq_adv"]
    adv_tok = adv_seq.unsqueeze(1).expand_as(d["mask"]).contiguous()
    grads, values = [], []
    for kw in (dict(advantages=adv_seq), dict(advantages=adv_tok), dict(advantages=adv_tok, token_level=True)):
        lp = d["log_probs"].clone().requires_grad_(True)
        out = gspo_loss(lp, d["old_log_probs"], action_mask=d["mask"], eps_low=0.05, eps_high=0.05, **kw)
        out.loss_sum.backward()
        values.append(out.loss_sum.item())
        grads.append(lp.grad)
    assert values[0] == pytest.approx(values[1], abs=1e-6) and values[0] == pytest.approx(values[2], abs=1e-6)
    assert_close(grads[1], grads[0], **ATOL)
    assert_close(grads[2], grads[0], **ATOL)


def loop_gspo(lp, old, adv, lengths, lo, hi):
    total, grads = 0.0, [[0.0] * len(r) for r in lp]
    for b in range(len(lp)):
        n = lengths[b]
        s = math.exp(sum(lp[b][i] - old[b][i] for i in range(n)) / n)
        s1, s2 = s * adv[b], min(max(s, 1 - lo), 1 + hi) * adv[b]
        total += -min(s1, s2)
        if s1 <= s2:  # unclipped term active: d(-s A)/d log pi_t = -A s / n
            for i in range(n):
                grads[b][i] = -adv[b] * s / n
    return total, grads


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lo,hi", [(0.05, 0.08), (3e-4, 4e-4)])
def test_gspo_matches_loop(seed, lo, hi):
    d = _random_batch(seed)
    lp = d["log_probs"].clone().requires_grad_(True)
    out = gspo_loss(lp, d["old_log_probs"], d["seq_adv"], d["mask"], eps_low=lo, eps_high=hi)
    out.loss_sum.backward()
    loss, grads = loop_gspo(L(d["log_probs"]), L(d["old_log_probs"]), L(d["seq_adv"]), d["lengths"], lo, hi)
    assert 0 < out.clipped.item() < d["mask"].sum().item()  # both branches are exercised
    assert out.loss_sum.item() == pytest.approx(loss, abs=1e-4)
    assert_close(lp.grad, t(grads), **ATOL)
    assert aggregate_count(d["mask"], "seq_mean_token_mean").item() == 8.0  # divide by the sequences


# ----------------------------------------------------------------------------------------------
# CISPO
# ----------------------------------------------------------------------------------------------

CI_RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 0.7]]
CI_ADVS = [[1.0, -2.0, 3.0], [-1.0, 1.0, -2.0]]
CI_OLD = [[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]]
CI_MASK = [[1, 1, 1], [1, 1, 0]]


def _ci_inputs():
    old = t(CI_OLD)
    return (old + torch.log(t(CI_RATIOS))).detach().requires_grad_(True), old, t(CI_ADVS), t(CI_MASK)


def test_cispo_by_hand_without_lower_bound():
    lp, old, adv, mask = _ci_inputs()
    out = cispo_loss(lp, old, adv, mask, eps_high=0.2)
    # weights clip(r, 0, 1.2): [1.2, 0.5, 1.1], [1.2, 0.5]; log pi = old + log r
    lps = [[-1.0 + math.log(1.5), -2.0 + math.log(0.5), -0.5 + math.log(1.1)],
           [-3.0 + math.log(1.5), -0.1 + math.log(0.5)]]
    w = [[1.2, 0.5, 1.1], [1.2, 0.5]]
    expected = sum(-w[b][i] * CI_ADVS[b][i] * lps[b][i] for b in range(2) for i in range(len(w[b])))
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-5)
    assert out.clipped.item() == 2.0  # the two ratios of 1.5
    out.loss_sum.backward()
    # gradient -clip(r) A on every real token, clipped ones included (REINFORCE-style, never zeroed)
    assert_close(lp.grad, t([[-1.2 * 1.0, -0.5 * -2.0, -1.1 * 3.0], [-1.2 * -1.0, -0.5 * 1.0, 0.0]]), **ATOL)


def test_cispo_lower_bound_clips_small_ratios():
    lp, old, adv, mask = _ci_inputs()
    out = cispo_loss(lp, old, adv, mask, eps_high=0.2, eps_low=0.4)
    assert out.clipped.item() == 4.0  # 1.5, 0.5, 1.5, 0.5 all outside [0.6, 1.2]
    out.loss_sum.backward()
    # the 0.5 weights become 0.6
    assert_close(lp.grad, t([[-1.2 * 1.0, -0.6 * -2.0, -1.1 * 3.0], [-1.2 * -1.0, -0.6 * 1.0, 0.0]]), **ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_cispo_gradient_is_minus_clipped_weight_times_advantage(seed):
    d = _random_batch(seed)
    lp = d["log_probs"].clone().requires_grad_(True)
    cispo_loss(lp, d["old_log_probs"], d["advantages"], d["mask"], eps_high=0.1, eps_low=0.1).loss_sum.backward()
    for b in range(8):
        for i in range(7):
            r = math.exp(d["log_probs"][b, i].item() - d["old_log_probs"][b, i].item())
            w = min(max(r, 0.9), 1.1)
            expected = -w * d["advantages"][b, i].item() if i < d["lengths"][b] else 0.0
            assert lp.grad[b, i].item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Truncated importance sampling and mismatch metrics
# ----------------------------------------------------------------------------------------------

TIS_GEN = [[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]]
TIS_DIFF = [[0.5, 1.0, -0.3], [2.0, 0.0, 5.0]]  # train - gen; the 5.0 is padding
TIS_MASK = [[1, 1, 1], [1, 1, 0]]


def _tis_inputs():
    gen = t(TIS_GEN)
    return (gen + t(TIS_DIFF)).requires_grad_(True), gen, t(TIS_MASK)


def test_tis_token_level_by_hand():
    train, gen, mask = _tis_inputs()
    w, frac = tis_weights(train, gen, mask, cap=2.0)
    # e^0.5 = 1.6487, e^1 = 2.718 -> 2, e^-0.3 = 0.7408; e^2 -> 2, e^0 = 1, padding 0
    assert_close(w, t([[math.exp(0.5), 2.0, math.exp(-0.3)], [2.0, 1.0, 0.0]]), **ATOL)
    assert frac.item() == pytest.approx(2 / 5)
    assert not w.requires_grad


def test_tis_sequence_level_by_hand():
    train, gen, mask = _tis_inputs()
    w, frac = tis_weights(train, gen, mask, cap=4.0, level="sequence")
    # row sums 0.5 + 1 - 0.3 = 1.2 -> e^1.2 = 3.32 (under 4); 2 + 0 = 2 -> e^2 = 7.39 -> 4
    assert_close(w, t([[math.exp(1.2)] * 3, [4.0, 4.0, 0.0]]), **ATOL)
    assert frac.item() == pytest.approx(1 / 2)


def test_tis_huge_log_ratio_stays_finite_and_bad_arguments_raise():
    mask = torch.ones(1, 3)
    w, frac = tis_weights(t([[0.0, 0.0, 0.0]]), t([[-1000.0, -1000.0, -1000.0]]), mask, cap=5.0, level="sequence")
    assert_close(w, t([[5.0, 5.0, 5.0]]))
    assert frac.item() == 1.0
    with pytest.raises(ValueError):
        tis_weights(t([[0.0]]), t([[0.0]]), torch.ones(1, 1), cap=0.0)
    with pytest.raises(ValueError):
        tis_weights(t([[0.0]]), t([[0.0]]), torch.ones(1, 1), cap=2.0, level="chunk")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_matches_loop(seed, level):
    d = _random_batch(seed)
    train, gen, cap = d["log_probs"], d["old_log_probs"], 1.5
    w, frac = tis_weights(train, gen, d["mask"], cap, level)
    ref, over, units = [[0.0] * 7 for _ in range(8)], 0, 0
    for b in range(8):
        n = d["lengths"][b]
        diffs = [train[b, i].item() - gen[b, i].item() for i in range(n)]
        if level == "token":
            for i, x in enumerate(diffs):
                ref[b][i] = min(math.exp(x), cap)
                over += math.exp(x) > cap
            units += n
        else:
            ws = math.exp(sum(diffs))
            ref[b][:n] = [min(ws, cap)] * n
            over += ws > cap
            units += 1
    assert_close(w, t(ref), **ATOL)
    assert frac.item() == pytest.approx(over / units)


def test_mismatch_metrics_by_hand():
    train = t([[-1.5, -1.8, 4.0], [-2.0, 0.0, 0.0]])
    gen = t([[-1.0, -2.0, 9.0], [-1.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # d = gen - train on real tokens: 0.5, -0.2, 1.0
    m = mismatch_metrics(train, gen, mask)
    k3 = [math.exp(-x) - 1 + x for x in (0.5, -0.2, 1.0)]
    assert m["gen_train_kl"] == pytest.approx(sum(k3) / 3, abs=1e-6)
    assert m["gen_train_kl_k1"] == pytest.approx((0.5 - 0.2 + 1.0) / 3, abs=1e-6)
    assert m["max_abs_logprob_diff"] == pytest.approx(1.0, abs=1e-6)
    assert m["mean_abs_logprob_diff"] == pytest.approx((0.5 + 0.2 + 1.0) / 3, abs=1e-6)


def test_mismatch_metrics_of_identical_log_probs_are_zero():
    lp = t([[-1.0, -2.0], [-0.5, -3.0]])
    m = mismatch_metrics(lp, lp.clone(), torch.ones(2, 2))
    assert all(v == 0.0 for v in m.values())
    assert mismatch_metrics(lp, lp, torch.zeros(2, 2))["gen_train_kl"] == 0.0


# ----------------------------------------------------------------------------------------------
# DAPO: overlong penalty and dynamic sampling
# ----------------------------------------------------------------------------------------------

def test_overlong_penalty_by_hand():
    # max_len 10, buffer 4: free up to 6, then -(len - 6) / 4, -1 from 10 on; times 0.5
    out = overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), max_len=10, buffer=4, penalty=0.5)
    assert_close(out, t([0.0, 0.0, -0.25 * 0.5, -0.5 * 0.5, -1.0 * 0.5, -1.0 * 0.5]))


def test_overlong_penalty_matches_eq_13_piecewise():
    max_len, buffer = 12, 5
    out = overlong_penalty(torch.arange(0, 20), max_len, buffer)
    for n in range(20):
        if n <= max_len - buffer:
            ref = 0.0
        elif n <= max_len:
            ref = ((max_len - buffer) - n) / buffer
        else:
            ref = -1.0
        assert out[n].item() == pytest.approx(ref, abs=1e-6)


def test_overlong_penalty_rejects_bad_buffers():
    for buffer in (0, 11):
        with pytest.raises(ValueError):
            overlong_penalty(torch.tensor([5]), max_len=10, buffer=buffer)


def test_groups_with_signal_by_hand():
    scores = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.51])
    # groups of 3: all equal / mixed / all equal / one differs
    assert groups_with_signal(scores, 3).tolist() == [False, True, False, True]
    assert groups_with_signal(scores, 3).repeat_interleave(3).shape == (12,)
