"""Start an embedded local Ray or join a running cluster."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


LOCAL_MIN_CPUS = 16


def init_ray(address: str | None = None, num_cpus: int | None = None, namespace: str = "coati_ray") -> None:
    """Join `address` (or $RAY_ADDRESS); otherwise start a local Ray on this machine.

    A local Ray gets at least `num_cpus` logical CPUs so that, e.g., 2 trainers of 1 CPU each fit
    on a 1-core laptop (they then share the core; correctness does not depend on it). It gets at
    least `LOCAL_MIN_CPUS` too: one process may run several stages on the same embedded Ray (the
    demo: SFT on one trainer, then PPO with five or more one-CPU actors).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # The Ray dashboard's token auth (on by default since 2.5x) needs a token a local run never
    # sets up; an embedded single-machine Ray listens on localhost only, so turn it off there.
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("COATI_RAY_CACHE", "HF_HOME", "RAY_AUTH_MODE")
                                if k in os.environ}}
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, num_cpus or 0, LOCAL_MIN_CPUS)
        logger.info("starting a local Ray with %d CPUs", cpus)
        ray.init(num_cpus=cpus, namespace=namespace, runtime_env=runtime_env, include_dashboard=None,
                 logging_level=logging.WARNING)
