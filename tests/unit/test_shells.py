"""The torch-free actor classes (coati_ray/workers/shells.py): each stands for its worker exactly,
and the driver's side of a PPO run imports no torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from coati_ray.workers import shells


def public_methods(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


@pytest.mark.parametrize("shell", shells.SHELLS, ids=lambda c: c.__name__)
def test_each_actor_class_forwards_exactly_its_workers_public_methods(shell):
    module, _, name = shell.WORKER.partition(":")
    worker = getattr(importlib.import_module(module), name)
    assert shells.worker_class(shell) is worker and shells.worker_class(worker) is worker
    assert shell.__name__ == worker.__name__  # the dashboard and process titles read the same
    assert set(shell.METHODS) == public_methods(worker)
    assert public_methods(shell) == set(shell.METHODS)


def test_the_driver_and_the_buffer_import_no_torch():
    """What a PPO driver imports to start and run the roles, and what the replay buffer imports to
    unpickle generator handles: none of it pulls torch (330 MB of PSS on a one-machine run)."""
    code = ("import sys; import coati_ray.pipelines.ppo, coati_ray.cluster.ppo_groups, coati_ray.workers.shells, "
            "coati_ray.workers.buffer, coati_ray.algos.kl_control, coati_ray.run_dir; "
            "from coati_ray.pipelines.ppo_roles import make_jobs, count_prompts; "
            "print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_actor_class_builds_its_worker_and_forwards_calls_to_it(micro_model):
    from coati_ray.experience import Experience
    from coati_ray.workers.reference import ReferenceWorker

    seq = torch.tensor([[5, 6, 7, 8, 9, 10]])
    exp = Experience(seq, torch.ones_like(seq), torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1),
                     torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    shell = shells.ReferenceWorker(micro_model)
    assert isinstance(shell.worker, ReferenceWorker)
    assert torch.equal(shell.log_probs(exp), ReferenceWorker(micro_model).log_probs(exp))


def test_a_transports_run_hook_reaches_the_worker_not_its_actor_class():
    from coati_ray.workers.policy import PolicyWorker

    rank = shells.PolicyWorker(0, 1)
    assert rank.run(lambda worker, x: (type(worker), worker.rank, x), 7) == (PolicyWorker, 0, 7)
