"""Start an embedded local Ray or join a running cluster."""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger(__name__)


LOCAL_MIN_CPUS = 16


def init_ray(address: str | None = None, num_cpus: int | None = None, namespace: str = "coati_ray",
             dashboard_host: str = "127.0.0.1", dashboard: bool = True) -> bool:
    """Join `address` (or $RAY_ADDRESS); otherwise start a local Ray on this machine.

    Returns False when joining a cluster (which may grow: an autoscaler adds nodes), True otherwise.

    A local Ray gets at least `num_cpus` logical CPUs so that, e.g., 2 trainers of 1 CPU each fit
    on a 1-core laptop (they then share the core; correctness does not depend on it). It gets at
    least `LOCAL_MIN_CPUS` too: one process may run several stages on the same embedded Ray (the
    demo: SFT on one trainer, then PPO with five or more one-CPU actors).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return not address
    # Ray's token auth stays as Ray sets it: a new local Ray turns it on (and writes
    # ~/.ray/auth_token if missing); a cluster has it on when its head was started with a token.
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("COATI_RAY_CACHE", "HF_HOME", "RAY_AUTH_MODE")
                                if k in os.environ}}
    if address:
        check_reachable(address)
        logger.info("joining Ray cluster at %s", address)
        ctx = ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, num_cpus or 0, LOCAL_MIN_CPUS)
        logger.info("starting a local Ray (%d logical CPUs on this %d-core machine)", cpus, os.cpu_count() or 1)
        # Ray's own line that token auth is on (with a link) says what ours after start-up does
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # The dashboard listens on 127.0.0.1 unless --dashboard_host says otherwise.
        if dashboard_host != "127.0.0.1":
            logger.warning("the Ray dashboard listens on %s: anyone who can reach it and has the token can run "
                           "code on this machine", dashboard_host)
        # No workers started ahead: ours carry a runtime_env (env_vars), so Ray could never hand them one
        # of those, and they held ~85 MB PSS for nothing (bench_peer.py's memory by role).
        ctx = _start_local(ray, num_cpus=cpus, namespace=namespace, runtime_env=runtime_env,
                           include_dashboard=None if dashboard else False, dashboard_host=dashboard_host,
                           logging_level=logging.WARNING,
                           _system_config={"prestart_worker_first_driver": False})
    if ctx.dashboard_url:
        logger.info("Ray dashboard: http://%s (%s)", ctx.dashboard_url, dashboard_sign_in(bool(address)))
    return not address


def dashboard_sign_in(joined: bool) -> str:
    """How to get into the dashboard under Ray's token auth, in a few words (docs/cluster.md says more:
    the token is ~/.ray/auth_token; from another machine, tunnel with `ray dashboard cluster.yaml`)."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return "token auth off: keep it on localhost"
    return "token auth on; the token: `ray get-auth-token`" + (" on the head node" if joined else "")


def _start_local(ray, **init_kwargs):
    """`ray.init(**init_kwargs)` for a single-machine Ray: loopback only, and ended with this process.

    Ray binds its gRPC servers (GCS, raylet node and object managers, every worker and the
    driver), its agents and its metrics exporters to all interfaces unless the node's IP is a
    loopback address, and on Linux `ray.init` turns 127.0.0.1 into the machine's routable IP
    (`services.resolve_ip_for_localhost`) unless clusters are disabled, as on macOS and Windows
    (`ray_constants.ENABLE_RAY_CLUSTER`). So this disables them for the `ray.init` call only: the
    node's IP becomes 127.0.0.1 and every one of those listens there
    (docs/cluster.md#ports-what-a-run-opens-and-what-the-token-covers).

    A watcher (coati_ray/cluster/reaper.py) ends this Ray's processes when this process ends,
    even by SIGKILL; Ray's own agents would otherwise outlive it by about a minute.
    """
    from coati_ray.cluster import reaper

    watcher = reaper.start()
    try:
        with _loopback_node_ip(ray):
            ctx = ray.init(**init_kwargs)
    except BaseException:
        if watcher:
            watcher.close()  # it ends whatever the failed ray.init left running
        raise
    node = ray._private.worker._global_node
    if watcher:
        watcher.attach(node)
    ip = node.node_ip_address
    logger.info("local Ray session %s listens on %s%s", node.get_session_dir_path(), ip,
                "; its processes end with this one" if watcher else "")
    if ip != "127.0.0.1":  # Ray's C++ servers bind loopback only for exactly this address
        logger.warning("the local Ray's node IP is %s: it listens beyond this machine's loopback", ip)
    return ctx


@contextlib.contextmanager
def _loopback_node_ip(ray):
    constants = ray._private.ray_constants
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):  # another Ray version: _start_local warns
        yield
        return
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        # Restored at once: a later ray.init(address=...) in this process must advertise a
        # routable address to the cluster it joins.
        constants.ENABLE_RAY_CLUSTER = saved


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) that nothing answers on is refused at once: Ray's own client
    retries the connection for minutes. 'auto' and other forms are left to Ray."""
    import socket

    from coati_ray.errors import ConfigError

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError("address", f"nothing answers at {address} within {timeout_s:g} s "
                          f"({e.strerror or type(e).__name__}): is the Ray head running there?") from None
