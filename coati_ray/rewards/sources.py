"""The reward sources of a run: from the flags (`RewardSpec`, checked in the driver before Ray
starts) to the scorers a reward actor holds (`build_source`), and their weighted sum.

Order and names (the metric keys `reward/<name>` and the order of `--reward_weights`):
    rm        --rm_path (or the demo reward model when no other source is given)
    <fn>      --reward_fn: the built-in's name (math, demo, format) or the function's name
    remote    --reward_url
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from coati_ray.errors import ConfigError
from coati_ray.rewards.functions import RewardBatch, call_reward_function, check_function_spec, split_spec

if TYPE_CHECKING:  # the driver checks the specs without torch; the reward actor builds the scorers with it
    import torch


@dataclass(frozen=True)
class RewardSpec:
    kind: str  # "rm" | "fn" | "remote"
    name: str  # metric name: reward/<name>
    target: str  # the model path, the function spec or the URL
    weight: float = 1.0


def reward_specs(rm_path: str | None, reward_fn: str | None, reward_url: str | None,
                 reward_weights: str | None) -> list[RewardSpec]:
    """The sources in order (rm, fn, remote) with their weights; checks every part (no Ray, nothing run)."""
    from coati_ray.rewards.verifiers import builtin

    specs: list[tuple[str, str, str]] = []
    if rm_path is not None:
        specs.append(("rm", "rm", rm_path))
    if reward_fn is not None:
        found = builtin(reward_fn)
        if found is None:
            check_function_spec(reward_fn)
            name = split_spec(reward_fn)[1]
        else:
            name = found[0]
        if name in ("mean", "std", "rm", "remote", "overlong"):  # taken: the total, the other sources
            name = f"fn_{name}"
        specs.append(("fn", name, reward_fn))
    if reward_url is not None:
        if not reward_url.startswith(("http://", "https://")):
            raise ConfigError("reward_url", f"expected an http:// or https:// URL, got {reward_url!r}")
        specs.append(("remote", "remote", reward_url))
    weights = [1.0] * len(specs)
    if reward_weights is not None:
        try:
            weights = [float(w) for w in reward_weights.split(",")]
        except ValueError:
            raise ConfigError("reward_weights", f"expected comma-separated numbers, got {reward_weights!r}") from None
        if len(weights) != len(specs):
            raise ConfigError("reward_weights", f"{len(weights)} weights for {len(specs)} reward sources "
                              f"({', '.join(s[1] for s in specs) or 'none'}, in that order)")
        if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
            raise ConfigError("reward_weights", f"must be finite numbers, got {reward_weights!r}")
    return [RewardSpec(k, n, t, w) for (k, n, t), w in zip(specs, weights)]


@dataclass
class RemoteOptions:
    timeout_s: float = 30.0
    retries: int = 3
    max_inflight: int = 4


def build_source(spec: RewardSpec, remote: RemoteOptions, model_source: Callable | None = None
                 ) -> Callable[[RewardBatch, object], torch.Tensor]:
    """A scorer `(batch, experience) -> (B,) float tensor` for `spec`, inside a reward actor.
    `model_source`: the reward-model scorer (the actor owns the model)."""
    import torch

    if spec.kind == "rm":
        assert model_source is not None
        return lambda batch, exp: model_source(exp)
    if spec.kind == "fn":
        from coati_ray.rewards.functions import load_function
        from coati_ray.rewards.verifiers import builtin

        found = builtin(spec.target)
        fn = found[1] if found else load_function(spec.target)
        label = spec.target if found else f"function {spec.target}"
        return lambda batch, exp: torch.tensor(call_reward_function(fn, label, batch))
    if spec.kind == "remote":
        from coati_ray.rewards.remote import RemoteReward

        client = RemoteReward(spec.target, remote.timeout_s, remote.retries, remote.max_inflight)
        return lambda batch, exp: torch.tensor(client(batch))
    raise ValueError(f"unknown reward source kind {spec.kind!r}")


def weighted_total(scores: dict[str, torch.Tensor], specs: list[RewardSpec]) -> torch.Tensor:
    """sum_s w_s * score_s, (B,)."""
    import torch

    if not specs:
        raise ValueError("no reward source: give --rm_path, --reward_fn or --reward_url")
    return torch.stack([s.weight * scores[s.name].float() for s in specs]).sum(0)
