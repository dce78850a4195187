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


@pytest.mark.parametrize("name", ["colossalai_zero2", "colossalai_gemini"])
def test_colossalai_strategies_say_what_is_missing(name):
    if importlib.util.find_spec("colossalai") is None:
        with pytest.raises(MissingExtraError, match=r"pip install 'coati_ray\[colossalai\]'"):
            make_strategy(name, torch.device("cpu"))
    else:
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            make_strategy(name, torch.device("cpu"))


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("accumulation_steps", 0), ("lr", -1.0),
                                         ("warmup_ratio", 1.5), ("grad_clip", -1.0)])
def test_bad_numbers_name_their_flag(field, value):
    with pytest.raises(ConfigError, match=f"--{field}:"):
        TrainArgs(**{field: value}).validate()
