"""Reach a running PPO job: change its number of generators, stop it cleanly, or show its status.

    python launchers/control.py --generators 4          # on the cluster's head node (or set RAY_ADDRESS)
    python launchers/control.py --generators 4 --address ray://head:10001
    python launchers/control.py --stop                  # stop after this step: checkpoint + model saved
    python launchers/control.py --status

The job reads the request at the start of its next step: new generators join the rollout pool as
soon as they are constructed (on an autoscaling cluster, a generator that finds no room waits
while the autoscaler adds a rollout node); retired ones finish the chunk they are making first.
No sample is lost or trained twice either way. The request travels through the Ray cluster (the
job's `control` actor), so it needs no open port and is behind the cluster's token auth.
"""

import json
import sys
from dataclasses import dataclass

from coati_ray.cli import parse, run_main, setup_logging
from coati_ray.config import _help
from coati_ray.errors import ConfigError


@dataclass
class ControlArgs:
    """What to ask of the running job, and where it runs."""

    generators: int | None = _help("Generators to run from the next step on.", default=None)
    stop: bool = _help("Stop the job after its current step (it saves as at the end).", default=False)
    status: bool = _help("Print the job's status and exit.", default=False)
    address: str = _help("Ray cluster of the job (default: auto, or $RAY_ADDRESS).", default="auto")
    namespace: str = _help("Ray namespace of the job.", default="coati_ray")

    def validate(self) -> None:
        if self.generators is not None and self.generators < 1:
            raise ConfigError("generators", f"must be >= 1, got {self.generators}")


def _asks_something(parts: list) -> str | None:
    args = parts[0]
    if args.generators is not None or args.status or args.stop:
        return None
    return "give --generators N, --stop or --status"


def main(argv=None) -> dict:
    setup_logging()
    (args,), _ = parse([ControlArgs], argv, "Scale, stop or inspect a running coati_ray PPO job.",
                       check=_asks_something)
    args.validate()
    import ray

    from coati_ray.cluster.control import NAME, find_control
    from coati_ray.cluster.ray_env import check_reachable

    check_reachable(args.address)
    ray.init(address=args.address, namespace=args.namespace, logging_level="ERROR", log_to_driver=False)
    try:
        control = find_control(args.namespace)
    except ValueError:
        raise ConfigError("address", f"no running PPO job on the Ray cluster at {args.address} (no actor "
                          f"{NAME!r} in namespace {args.namespace!r})") from None
    if args.generators is not None:
        status = ray.get(control.request_generators.remote(args.generators))
    if args.stop:
        status = ray.get(control.request_stop.remote())
    if args.status:
        status = ray.get(control.get_status.remote())
    print(json.dumps(status))
    return status


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
