import pytest
import torch

from coati_ray.algos.logprobs import log_probs_from_logits
from coati_ray.algos.rm_loss import log_exp_loss, log_sig_loss
from coati_ray.errors import ConfigError, ModelLoadError
from coati_ray.models.heads import action_log_probs, last_token_index, sequence_reward, token_values
from coati_ray.models.loading import load_causal_lm, load_value_model, resolve_model_path


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bloom"])
def test_every_seed_family_has_a_preset_that_loads_and_generates(family):
    path = resolve_model_path(None, family, "micro")
    model = load_causal_lm(path, family)
    assert model.config.model_type == family
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_tiny_default_is_a_few_million_parameters():
    model = load_causal_lm(resolve_model_path(None, "auto", "tiny"))
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 < n < 10e6


def test_action_log_probs_equal_a_per_token_loop(micro_model):
    model = load_causal_lm(micro_model).eval()
    seq = torch.tensor([[1, 20, 30, 40, 50, 60], [1, 21, 31, 41, 51, 61]])
    mask = torch.ones_like(seq)
    with torch.no_grad():
        lp = action_log_probs(model, seq, mask, num_actions=3)  # (2, 3)
        for b in range(2):
            for i, t in enumerate(range(3, 6)):
                logits = model(input_ids=seq[b:b + 1, :t]).logits[0, -1]
                assert lp[b, i].item() == pytest.approx(torch.log_softmax(logits, -1)[seq[b, t]].item(), abs=1e-5)


def test_log_probs_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # (1, 2, 2)
    lp = log_probs_from_logits(logits, torch.tensor([[0, 1]]))
    expected = torch.tensor([[torch.log(torch.tensor(0.5)), -torch.log1p(torch.exp(torch.tensor(1.0)))]])
    assert torch.allclose(lp, expected, atol=1e-6)


def test_rm_losses_by_hand_and_equal_to_each_other():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 3.0])
    expected = torch.tensor([-torch.log(torch.sigmoid(torch.tensor(2.0))), torch.log(torch.tensor(2.0)),
                             torch.log1p(torch.exp(torch.tensor(4.0)))])
    assert torch.allclose(log_sig_loss(chosen, rejected), expected, atol=1e-6)
    assert torch.allclose(log_exp_loss(chosen, rejected), expected, atol=1e-6)
    big = torch.tensor([200.0])  # no overflow for large margins
    assert torch.isfinite(log_sig_loss(-big, big)).all() and torch.isfinite(log_exp_loss(-big, big)).all()


def test_reward_reads_the_last_real_token_for_left_and_right_padding(micro_model):
    torch.manual_seed(0)
    model = load_value_model(micro_model).eval()
    ids = torch.tensor([[1, 7, 8, 9]])
    right = torch.tensor([[1, 7, 8, 9, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert last_token_index(right[1]).tolist() == [3] and last_token_index(left[1]).tolist() == [5]
    with torch.no_grad():
        plain = token_values(model, ids, torch.ones_like(ids))[0, -1]
        assert sequence_reward(model, *right).item() == pytest.approx(plain.item(), abs=1e-5)
        assert sequence_reward(model, *left).item() == pytest.approx(plain.item(), abs=1e-4)


@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_save_load_round_trip_gives_identical_logits(micro_model, tmp_path, kind):
    torch.manual_seed(0)
    model = (load_causal_lm(micro_model) if kind == "causal_lm" else load_value_model(micro_model)).eval()
    model.save_pretrained(tmp_path)
    again = (load_causal_lm(str(tmp_path)) if kind == "causal_lm" else load_value_model(str(tmp_path))).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_nonexistent_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_model_family_mismatch_and_unknown_family(micro_model):
    with pytest.raises(ConfigError, match="holds a 'llama' model, not 'gpt2'"):
        load_causal_lm(micro_model, "gpt2")
    with pytest.raises(ConfigError, match="unknown model family 'gpt5'"):
        resolve_model_path(None, "gpt5")
