"""The ground floor: small helpers every layer may import (it imports no other coati_ray module
but `errors`). Ray calls that surface user errors and wait with bounds, logging set-up shared by
launchers and actor processes."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Quiet the libraries' per-load chatter (progress bars, load reports); our logs say what matters.

    Also called in every worker process, which does not run the launcher's setup.
    """
    for noisy in ("transformers", "datasets", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def current_node_id() -> str:
    """The Ray node this process runs on (actors report it so a run can show where each role ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def start_actor(cls: type, name: str, args: tuple, num_cpus: float = 1.0, num_gpus: float = 0.0,
                resources: dict[str, float] | None = None, **options):
    """Start `cls` as a Ray actor named `name` (a leftover actor of that name is killed first)."""
    import ray

    try:
        ray.kill(ray.get_actor(name))  # a previous run in this namespace left it behind
    except ValueError:
        pass
    return ray.remote(cls).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                                   **options).remote(*args)


def get_unwrapped(refs):
    """ray.get, re-raising a user error (CoatiError) from an actor as itself, not wrapped."""
    import ray

    from coati_ray.errors import CoatiError

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        while isinstance(cause, ray.exceptions.RayTaskError):  # raised on through another actor
            cause = cause.cause
        if isinstance(cause, CoatiError):  # the user's error, as raised in the actor
            raise cause from None
        raise


def get_restartable(call, timeout_s: float = 900.0):
    """`get_unwrapped(call())` for an actor Ray may be restarting: while it answers
    ActorUnavailableError ("restarting"), make the (idempotent) call again, up to `timeout_s`
    (a restarting generator reloads its engine: a vLLM one takes about a minute)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return get_unwrapped(call())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def watchdog_s() -> float:
    """How long a group call may run before the driver gives up on it ($COATI_WATCHDOG_S, default
    one hour: far above any step here, far below a weekend spent waiting on a stuck collective)."""
    return float(os.environ.get("COATI_WATCHDOG_S", "3600"))


class StuckError(RuntimeError):
    """A remote call ran past the watchdog: most often ranks that no longer agree on a collective."""


def get_all(refs: list, labels: list[str] | None = None, timeout_s: float | None = None) -> list:
    """`get_unwrapped` of every ref, raising as soon as *any* fails, or StuckError once `timeout_s`
    (default `watchdog_s()`) passes with some still running; `labels` name the calls in that message.

    The ranks of a group meet in collectives: when one dies, the others block in the next
    collective, so waiting for the refs in order would hang on a live rank instead of reporting
    the dead one; when one never joins, all wait forever, which the watchdog turns into an error.
    """
    wait_each(refs, labels, timeout_s)
    return get_unwrapped(refs)


def wait_each(refs: list, labels: list[str] | None = None, timeout_s: float | None = None,
              skip_first: bool = False) -> None:
    """Wait for every ref, raising the first failure as it arrives, or StuckError past the watchdog.
    `skip_first`: leave refs[0]'s value unfetched (rank 0's result stays in the object store)."""
    import time

    import ray

    timeout_s = watchdog_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    left = list(refs)
    while left:
        done, left = ray.wait(left, num_returns=1, timeout=max(0.0, deadline - time.monotonic()),
                              fetch_local=not skip_first)
        if not done:
            pending = [labels[refs.index(r)] if labels else f"call {refs.index(r)}" for r in left]
            finished = len(refs) - len(left)
            states = actor_states([p.split(".", 1)[0] for p in pending])
            named = [f"{p} ({states[p.split('.', 1)[0]]})" if p.split(".", 1)[0] in states else p for p in pending]
            raise StuckError(f"waited {timeout_s:g} s for {', '.join(named)} ({finished} of {len(refs)} "
                             "finished): still running, most likely blocked in a collective that another rank "
                             "never joined; raise $COATI_WATCHDOG_S if a step really takes this long")
        if not (skip_first and done[0] is refs[0]):
            get_unwrapped(done)  # raises if that call failed


def actor_states(names: list[str]) -> dict[str, str]:
    """'ALIVE, pid 4242, 0% CPU' for each named live actor in Ray's actor table ("on node ab12cd34"
    instead of the CPU for one on another machine); what cannot be found is left out. For
    the watchdog's message: a stuck rank at 0% CPU waits in a collective, one at 100% computes."""
    import time

    try:
        import psutil
        from ray._private.state import actors  # the GCS's actor table: needs no dashboard (ray.util.state does)

        wanted = set(names)
        found = [(a["Name"], a["State"], a.get("Pid"), a.get("Address", {}).get("NodeID", ""))
                 for a in actors().values() if a.get("Name") in wanted and a.get("State") != "DEAD"]
        here = current_node_id()
    except Exception:  # the table is an aid to the message, never a reason to fail differently
        return {}
    procs = {}
    for name, _, pid, node in found:
        if node == here and pid:
            try:
                procs[name] = psutil.Process(pid)
                procs[name].cpu_percent(None)  # starts the measurement window
            except psutil.Error:
                pass
    if procs:
        time.sleep(0.5)  # the window over which CPU use is measured
    out = {}
    for name, state, pid, node in found:
        try:
            use = f"{procs[name].cpu_percent(None):.0f}% CPU" if name in procs else f"on node {node[:8]}"
        except psutil.Error:
            use = "its process is gone"
        out[name] = f"{state}, pid {pid}, {use}"
    return out


def process_group_backend(device) -> str:
    """torch.distributed's backend for a trainer group on `device` (a torch.device)."""
    return "nccl" if device.type == "cuda" else "gloo"

