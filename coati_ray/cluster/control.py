"""A running PPO job's mailbox to the outside, and its dashboard metrics: `JobControl`, held by the
job's replay buffer actor `buffer-0` (`JobBuffer`, below).

In: requests (`python launchers/control.py --generators N | --stop`, or `request_generators` /
`request_stop`), which the driver reads at the start of every step. Out: the job's status, and its metrics as Ray
custom metrics (`ray.util.metrics`), which every node's metrics agent serves to Prometheus and the
Ray dashboard's Metrics view as `ray_coati_*`.

It listens on no port of its own: it is reached through the Ray cluster (and so behind the
cluster's token auth), by name, in the job's namespace.
"""

from __future__ import annotations

import logging
from typing import Any

from coati_ray.workers.buffer import ReplayBuffer
from coati_ray.workers.chunks import StepPlan

logger = logging.getLogger(__name__)

NAME = "buffer-0"  # the actor that holds the job's control
NAMESPACE = "coati_ray"

# metric name -> (key in the driver's per-step metrics, description)
GAUGES = {
    "coati_reward_mean": ("reward/mean", "Mean reward-model score of the step's samples"),
    "coati_kl_mean": ("kl/mean", "Mean per-sequence KL(policy || reference) of the step's samples"),
    "coati_policy_loss": ("policy/loss", "PPO clipped policy loss"),
    "coati_value_loss": ("value/loss", "Critic value loss"),
    "coati_rollout_tokens_per_s": ("rollout/tokens_per_s", "Response tokens generated per second, all generators"),
    "coati_buffer_fill": ("buffer/fill", "Samples held in the replay buffer"),
    "coati_sample_staleness": ("buffer/staleness_mean", "Mean weight versions a trained sample lags the policy"),
    "coati_weight_version": ("train/step", "Policy weight version (PPO steps applied)"),
    "coati_step_time_s": ("timing/step", "Wall time of the last PPO step"),
    "coati_generators": ("generators/pooled", "Generators in the rollout pool"),
    "coati_generator_wait_weights_share": ("generators/wait_weights_share",
                                           "Share of generator time spent waiting for new weights"),
    "coati_generator_wait_buffer_share": ("generators/wait_buffer_share",
                                          "Share of generator time spent waiting on a full buffer"),
}


class JobControl:
    def __init__(self, job_name: str):
        from ray.util.metrics import Gauge

        self.job_name = job_name
        self.target: int | None = None
        self.stop = False
        self.status: dict = {"job": job_name, "step": 0, "generators": 0, "state": "starting"}
        self.gauges = {name: Gauge(name, description=desc, tag_keys=("job",)) for name, (_, desc) in GAUGES.items()}

    def request_generators(self, n: int) -> dict:
        """Ask the job to run `n` generators from its next step on; returns the current status."""
        if n < 1:
            raise ValueError(f"generators must be >= 1, got {n}")
        self.target = n
        logger.info("control: %d generators requested", n)
        return dict(self.status, target=n)

    def request_stop(self) -> dict:
        """Ask the job to stop after its current step, saving a checkpoint and the model as at a normal end."""
        self.stop = True
        logger.info("control: stop requested")
        return dict(self.status, stop=True)

    def poll(self) -> tuple[int | None, bool]:
        """(generators requested, stop requested): read by the driver at the start of every step."""
        return self.target, self.stop

    def report(self, status: dict, metrics: dict[str, float]) -> None:
        """Called by the driver after every step."""
        self.status = {**self.status, **status}
        for name, (key, _) in GAUGES.items():
            if key in metrics:
                self.gauges[name].set(float(metrics[key]), tags={"job": self.job_name})

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()

    def get_status(self) -> dict:
        return dict(self.status, target=self.target)


class JobBuffer(ReplayBuffer, JobControl):
    """A PPO job's `buffer-0`: the replay buffer (`workers/buffer.py`) and the job's control mailbox in
    one actor. In a process of its own the mailbox cost ~60 MB of PSS (docs/benchmarks.md)."""

    def __init__(self, limit: int, plan: StepPlan, generators: dict[int, Any], job_name: str):
        ReplayBuffer.__init__(self, limit, plan, generators)
        JobControl.__init__(self, job_name)


def find_control(namespace: str = NAMESPACE):
    """The running job's control actor (call after `ray.init(address=..., namespace=...)`)."""
    import ray

    return ray.get_actor(NAME, namespace=namespace)


def request_generators(n: int, namespace: str = NAMESPACE) -> dict:
    """Ask the PPO job running on this Ray cluster to run `n` generators (the API behind
    `launchers/control.py`). Returns the job's status."""
    import ray

    return ray.get(find_control(namespace).request_generators.remote(n))


def request_stop(namespace: str = NAMESPACE) -> dict:
    """Ask the PPO job running on this Ray cluster to stop cleanly after its current step."""
    import ray

    return ray.get(find_control(namespace).request_stop.remote())
