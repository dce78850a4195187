"""Weight sync for `--colocate all`: nothing moves. Each trainer rank's generator samples with the
rank's own policy module (workers/hybrid.py), so after an update it already holds the new weights.

`connect` points every rank's generator at its module; `publish` only records the version on
every rank (what the next rollout reports it sampled with). Generators are neither restarted nor
scaled: each lives and dies with its trainer rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coati_ray.sync.base import WeightSync, WeightTicket


@dataclass(frozen=True)
class SharedTicket(WeightTicket):
    def bring_up_to_date(self, generator) -> float:
        return 0.0  # the module it samples with is the trainer's: always current


def _attach(worker, version: int) -> None:
    worker.version = version
    worker.attach_generator(version)


def _set_version(worker, version: int) -> None:
    worker.version = version


class SharedModuleSync(WeightSync):
    restartable_generators = False
    scalable = False

    def connect(self, generators: dict[int, Any], version: int) -> WeightTicket:
        self.policy.run(_attach, version)
        return SharedTicket(version)

    def publish(self, version: int) -> WeightTicket:
        self.policy.run(_set_version, version)
        return SharedTicket(version)
