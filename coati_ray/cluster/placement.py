"""Where each role's actors run on a multi-node cluster.

`cluster.yaml` gives its node types a custom resource that marks what they are for:

    rollout nodes   resources: {"rollout": 1}   generators, references, rewards
    trainer nodes   resources: {"trainer": 1}   policy trainers, critic trainers

Every actor of a role asks for `MARKER_AMOUNT` of its node type's marker, so it can only land on
such a node, and a node holds as many as its CPUs / GPUs allow (the marker never runs out).
The replay buffer and the driver stay on the head node (what they own dies with their node).

Trainer ranks of one group go into one placement group, PACK (one node when they fit: their
collectives stay local); generators are SPREAD over the rollout nodes.

`--placement auto` (the default) uses the markers when the cluster advertises them, so a laptop's
embedded Ray, which has none, runs everything as before; `nodes` insists on them (an error names
the missing resource); `none` ignores them.
"""

from __future__ import annotations

ROLLOUT = "rollout"
TRAINER = "trainer"
MARKER_AMOUNT = 0.001  # per actor: the marker (capacity 1 per node) never limits how many fit
# role -> the marker resource of the node type it runs on
ROLE_NODE = {"generator": ROLLOUT, "reference": ROLLOUT, "reward": ROLLOUT, "trainer": TRAINER, "critic": TRAINER}
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own marker of the head node


def role_resources(roles, available: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each role's custom resources: its --custom_resources plus, when placement uses node types,
    its node type's marker (and the head node's for the buffer, which holds the job's control).

    `available`: `ray.cluster_resources()`. 'auto' uses node types when any marker is there: a
    cluster that autoscales one node type from zero still gets its roles placed (they wait for it).
    """
    import logging

    res = {role: dict(r) for role, r in roles.resources().items()}
    names = {ROLLOUT: roles.rollout_resource, TRAINER: roles.trainer_resource}
    use = roles.placement == "nodes" or (roles.placement == "auto" and any(n in available for n in names.values()))
    if not use:
        return res
    for kind, name in names.items():
        if name not in available:
            logging.getLogger(__name__).warning(
                "placement: no node has the resource %r yet; the %s roles wait until one joins (an autoscaler adds "
                "such nodes for pending actors)", name, kind)
    for role, kind in ROLE_NODE.items():
        res.setdefault(role, {})[names[kind]] = MARKER_AMOUNT
    res.setdefault("buffer", {})[HEAD_RESOURCE] = MARKER_AMOUNT
    return res


def trainer_bundles(n: int, cpus: float, gpus: float, resources: dict[str, float] | None) -> list[dict[str, float]]:
    bundle = {"CPU": cpus, "GPU": gpus, **(resources or {})}
    return [{k: v for k, v in bundle.items() if v} for _ in range(n)]


def reserve_packed(bundles: list[dict[str, float]], what: str, log_every_s: float = 60.0):
    """A PACK placement group for `bundles` (one node when they fit), once Ray has reserved it.

    On an autoscaling cluster the reservation may wait for a node to start: say so now and then
    instead of hanging silently, and give up after the watchdog's bound ($COATI_WATCHDOG_S) with a
    StuckError naming what was asked for and what the cluster has free.
    """
    import logging

    import ray
    from ray.util.placement_group import placement_group

    from coati_ray.runtime import StuckError, watchdog_s

    pg = placement_group(bundles, strategy="PACK")
    waited, bound = 0.0, watchdog_s()
    while not ray.wait([pg.ready()], timeout=min(log_every_s, max(bound - waited, 0.0)))[0]:
        waited += min(log_every_s, max(bound - waited, 0.0))
        if waited >= bound:
            ray.util.remove_placement_group(pg)
            raise StuckError(f"placement: {what} waited {waited:.0f} s for {bundles} and Ray could not reserve "
                             f"them; the cluster has {ray.available_resources()} free (actors of another run may "
                             "hold them); raise $COATI_WATCHDOG_S if nodes are still starting")
        logging.getLogger(__name__).warning("placement: %s still waits for %s after %.0f s; cluster has %s", what,
                                            bundles, waited, ray.available_resources())
    return pg
