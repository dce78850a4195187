"""The weight-sync interface the driver holds, and the ticket every rollout request carries.

    sync = transport_class(name)(policy)          # policy: the trainer group (PolicyGroup)
    ticket = sync.connect(generators, version)    # once, after the roles start (and a resume)
    ...train step v...
    ticket = sync.publish(v + 1)                  # after each update
    buffer.produce(step, ticket.version, ticket)  # each rollout brings its generator up to date first

A ticket is small and picklable: it names a weight version and knows how a generator that holds
an older one gets it (load it from the object store, or nothing: the push already happened).
Each side of a transport runs its own functions on the workers through the generic
`run(fn, *args)` hooks of `GeneratorWorker` and `PolicyWorker`, so a new transport needs no
change outside its module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class WeightTicket(ABC):
    version: int  # the newest published weight version

    @abstractmethod
    def bring_up_to_date(self, generator) -> float:
        """Give `generator` (a GeneratorWorker, in its process) weights `version` if it holds older
        ones; the seconds it took (0 when it was current)."""


class WeightSync(ABC):
    """One transport. Subclasses set the class flags and implement `connect` and `publish`."""

    restartable_generators: ClassVar[bool] = True  # a restarted generator can catch up through a ticket
    scalable: ClassVar[bool] = True  # generators may join and leave while the run goes on

    def __init__(self, policy):
        self.policy = policy  # the trainer group; rank 0 holds what is sent

    @classmethod
    def check_config(cls, rollout, model) -> None:
        """Refuse settings this transport cannot serve (a ConfigError naming the flag)."""

    @classmethod
    def engine_options(cls) -> dict[str, Any]:
        """Extra vLLM engine arguments the transport needs in every generator's engine."""
        return {}

    @abstractmethod
    def connect(self, generators: dict[int, Any], version: int) -> WeightTicket:
        """Join the generators (index -> actor handle) that start the run; the ticket of `version`
        (0: the initial policy they loaded; > 0 after a resume)."""

    @abstractmethod
    def publish(self, version: int) -> WeightTicket:
        """Make the trainers' current weights, `version`, available; the ticket the next rollouts carry."""

    def on_generator_added(self, index: int, handle) -> None:
        """A generator joined the run (only when `scalable`)."""

    def on_generator_removed(self, index: int) -> None:
        """Generator `index` is gone for good; raise if the transport cannot go on without it."""
