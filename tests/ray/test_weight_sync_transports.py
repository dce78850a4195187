"""Every registered weight-sync transport through the one interface the driver uses, on a real
local Ray with a real policy trainer actor and a real generator actor (micro model, CPU).

    sync = transport_class(name)(policy); ticket = sync.connect(...); ticket = sync.publish(v)

The object store runs end to end: the generator holds the trainer's weights after the publish.
NCCL needs CUDA GPUs and vLLM engines; here it runs as far as the CPU allows: it joins the same
actors through the same calls and refuses with one line naming the flag.
"""

from __future__ import annotations

import sys

import pytest
import ray.cloudpickle
import torch
from helpers import rollout

from coati_ray.cluster.ppo_groups import PolicyGroup
from coati_ray.config import ModelArgs, PromptDataArgs
from coati_ray.engines.backends import make_backend
from coati_ray.errors import ConfigError
from coati_ray.experience import Experience
from coati_ray.ppo_config import ObjectiveArgs, RolloutArgs
from coati_ray.runtime import get_all, start_actor
from coati_ray.sync import TRANSPORTS, transport_class
from coati_ray.sync.base import WeightSync
from coati_ray.workers.generator import GeneratorWorker
from coati_ray.workers.job import PolicyJob, RolloutJob, UpdateSpec

# What each transport does on this CPU machine: None = the full round trip; else the error it gives.
# A new transport adds its line here (and its module plus one line in coati_ray/sync/__init__.py).
ON_CPU = {"object_store": None, "nccl": "--vllm_weight_sync: nccl pushes into vLLM engines"}
TOL = 1e-5
# The helpers below run inside the actors (the transports' `run` hooks), which cannot import tests/.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def actors(ray_cluster, micro_model, demo_dir):
    policy = PolicyGroup(1, 1.0, name_prefix="sync-trainer")
    update = UpdateSpec("ddp", lr=1e-2, grad_clip=1.0, train_batch_size=2, max_epochs=1, seed=42)
    model = ModelArgs(pretrain=micro_model)
    get_all(policy.start_setup(PolicyJob(model=model, policy_path=micro_model, update=update, objective=ObjectiveArgs(),
                                         temperature=1.0, pretrain_file=None, data=PromptDataArgs())))
    job = RolloutJob(model=model, policy_path=micro_model, prompt_file=str(demo_dir / "prompts_train.jsonl"),
                     data=PromptDataArgs(), rollout=RolloutArgs(), objective=ObjectiveArgs(), seed=42,
                     engine_options={})
    gen = start_actor(GeneratorWorker, "sync-generator-0", (0, job, [None], [None]), num_cpus=0.5)
    yield policy, gen
    policy.shutdown()
    ray_cluster.kill(gen)


def _perturb(worker, seed: int) -> None:
    """Stand-in for an optimizer step: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _experience(micro_model, tokenizer) -> Experience:
    backend = make_backend("hf", micro_model, "auto", "fp32", None, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           torch.device("cpu"), 0)
    return rollout(backend, tokenizer)

def test_every_transport_is_registered_with_its_cpu_outcome():
    assert set(TRANSPORTS) == set(ON_CPU)
    for name in TRANSPORTS:
        cls = transport_class(name)
        assert issubclass(cls, WeightSync) and not getattr(cls, "__abstractmethods__", None), name


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_a_transport_brings_the_generator_to_the_published_weights(ray_cluster, actors, micro_model, tokenizer, name):
    policy, gen = actors
    exp = _experience(micro_model, tokenizer)
    sync = transport_class(name)(policy)
    expected = ON_CPU[name]
    if expected is not None:
        with pytest.raises(ConfigError, match=expected):
            sync.connect({0: gen}, 0)
        return
    version = ray_cluster.get(gen.weight_version.remote())
    ticket = sync.connect({0: gen}, version)
    assert ticket.version == version
    policy.run(_perturb, version + 1)
    ticket = sync.publish(version + 1)
    assert ticket.version == version + 1
    g_version, g_lp = ray_cluster.get(gen.sync_check.remote(ticket, exp))
    t_lp = policy.score_log_probs(exp)
    assert g_version == version + 1
    assert (g_lp - t_lp).abs().max() < TOL  # the generator scores with the trainer's new weights
    # a ticket that is not newer loads nothing
    assert ray_cluster.get(gen.run.remote(_bring, ticket)) == 0.0


def _bring(generator, ticket):
    return ticket.bring_up_to_date(generator)
