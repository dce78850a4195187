import importlib.util

import pytest
import torch

from coati_ray.config import TrainArgs
from coati_ray.engines.strategy import make_strategy
from coati_ray.errors import ConfigError, MissingExtraError


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--strategy: unknown strategy 'zero9'; expected one of ddp, fsdp"):
        TrainArgs(strategy="zero9").validate()
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("zero9", torch.device("cpu"))


@pytest.mark.parametrize("name", ["colossalai_zero2", "colossalai_gemini", "colossalai_ddp", "colossalai_hybrid"])
def test_colossalai_strategies_say_what_is_missing(name):
    TrainArgs(strategy=name).validate()  # a known name
    if importlib.util.find_spec("colossalai") is None or importlib.util.find_spec("colossalai.booster") is None:
        with pytest.raises(MissingExtraError, match=r"pip install 'coati_ray\[colossalai\]'"):
            make_strategy(name, torch.device("cpu"))
    elif name in ("colossalai_zero2", "colossalai_gemini"):
        with pytest.raises(ConfigError, match="needs a CUDA GPU.*colossalai_ddp or colossalai_hybrid"):
            make_strategy(name, torch.device("cpu"))
    else:
        assert make_strategy(name, torch.device("cpu")).name == name  # the CPU booster strategies


def test_ddp_hooks_are_the_plain_torch_loop():
    strategy = make_strategy("ddp", torch.device("cpu"))
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    wrapped, opt = strategy.prepare(model, lr=0.5, weight_decay=0.1, betas=(0.8, 0.9))
    assert wrapped is model  # one process: nothing to wrap
    assert type(opt) is torch.optim.AdamW and strategy.schedulable(opt) is opt
    assert opt.param_groups[0]["params"] == [model.weight]  # trainable parameters only
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["betas"]) == (0.5, 0.1, (0.8, 0.9))
    x = torch.ones(4, 3)
    strategy.backward(model(x).sum() * 10, wrapped, opt)
    expected = float(model.weight.grad.norm())
    before = model.weight.detach().clone()
    assert strategy.optimizer_step(wrapped, opt, max_norm=1.0) == pytest.approx(expected)  # the norm before clipping
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("accumulation_steps", 0), ("lr", -1.0),
                                         ("warmup_ratio", 1.5), ("grad_clip", -1.0)])
def test_bad_numbers_name_their_flag(field, value):
    with pytest.raises(ConfigError, match=f"--{field}:"):
        TrainArgs(**{field: value}).validate()
