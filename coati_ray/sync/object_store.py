"""Weight sync through Ray's object store (the default; any generator backend, LoRA included).

Trainer rank 0 returns each version once as a `WeightUpdate` (version + `(name, tensor)` pairs;
LoRA: adapter tensors only; each tensor an out-of-band buffer read from shared memory without a
copy). The ticket holds its ObjectRef: a generator older than the ticket reads the update
straight from the store before its next rollout, so a restarted or newly added generator catches
up by itself, and the driver never holds the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coati_ray.sync.base import WeightSync, WeightTicket


@dataclass(frozen=True)
class StoreTicket(WeightTicket):
    ref: Any = None  # ObjectRef of the WeightUpdate; None for version 0 (the weights every generator starts with)

    def bring_up_to_date(self, generator) -> float:
        if generator.version >= self.version or self.ref is None:
            return 0.0
        import ray

        return generator.load_weights(ray.get(self.ref))


class ObjectStoreSync(WeightSync):
    def connect(self, generators: dict[int, Any], version: int) -> WeightTicket:
        return self.publish(version) if version > 0 else StoreTicket(0)

    def publish(self, version: int) -> WeightTicket:
        return StoreTicket(version, self.policy.publish(version))
