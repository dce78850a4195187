"""A simulated multi-node Ray cluster on one machine (one raylet per node), for tests and benchmarks.

Measured on Ray 2.60 on a 2-core machine: head with dashboard ~8-10 s, each extra node ~2.5 s,
``ray.init(address=...)`` ~0.7 s; a head plus two nodes is ready in 12-15 s.

* Token auth: Ray 2.60 turns it on for a *new* ``ray.init()`` cluster (and writes
  ``~/.ray/auth_token``), and for ``ray start``/``ray.init("auto")`` when that file exists. A
  ``Cluster`` from ``ray.cluster_utils`` follows ``RAY_AUTH_MODE`` only; with ``token`` and no token
  its GCS aborts. ``start_sim_cluster`` sets ``RAY_AUTH_MODE=disabled`` before anything starts, so
  the dashboard and its HTTP API need no token.
* Metrics: ``metrics_report_interval_ms`` defaults to 10000, so a new ``ray.util.metrics`` value
  can take up to ~10 s to show. The system config below makes it ~1 s. Every node serves Prometheus
  text at ``http://<ip>:<MetricsExportPort>/metrics``; user metrics get a ``ray_`` prefix
  (``coati_reward_mean`` -> ``ray_coati_reward_mean{...,role="..."}``) and show up on the node of the
  process that recorded them. The driver's own metrics are exported as well, on the head node.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["SimCluster", "list_actors_http", "metrics_text", "start_sim_cluster"]

FAST_METRICS_CONFIG = {"metrics_report_interval_ms": 1000}


@dataclass
class SimCluster:
    cluster: object  # ray.cluster_utils.Cluster
    dashboard_url: str  # "http://127.0.0.1:PORT"
    metrics_urls: list[str]  # one Prometheus URL per node: head, then ``nodes`` in order
    node_ids: list[str]  # hex node ids, same order as metrics_urls
    startup_s: float
    connected: bool = False
    _down: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)`` or ``RAY_ADDRESS`` in a subprocess."""
        return self.cluster.address

    @property
    def ray(self):
        """The ``ray`` module (the driver is connected when ``connected`` is true)."""
        import ray

        return ray

    @property
    def actors_page_url(self) -> str:
        """The dashboard's actors page (a hash route of the single-page app)."""
        return self.dashboard_url + "/#/actors"

    def shutdown(self) -> None:
        if self._down:
            return
        self._down = True
        import ray

        if self.connected and ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_sim_cluster(
    nodes: list[dict],
    head_cpus: int,
    dashboard_port: int | None = None,
    *,
    connect: bool = True,
    fast_metrics: bool = True,
    system_config: dict | None = None,
    head_args: dict | None = None,
    ready_timeout_s: float = 60.0,
) -> SimCluster:
    """Start a head node (dashboard on 127.0.0.1) plus one node per entry of ``nodes``.

    Each entry of ``nodes`` holds ``ray.cluster_utils.Cluster.add_node`` keywords, e.g.
    ``{"num_cpus": 1, "resources": {"rollout": 1}}``. ``dashboard_port=None`` lets the dashboard
    pick a free port. With ``connect`` the driver joins via ``ray.init(address=cluster.address)``.
    Returns once every node's metrics endpoint and the dashboard's actor API answer.
    """
    # Must be in the environment before Ray starts: the Ray processes inherit it.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster

    sys_cfg = dict(FAST_METRICS_CONFIG) if fast_metrics else {}
    sys_cfg.update(system_config or {})
    head_node_args = dict(
        num_cpus=head_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=0 if dashboard_port is None else dashboard_port,
    )
    if sys_cfg:
        head_node_args["_system_config"] = sys_cfg
    head_node_args.update(head_args or {})

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=head_node_args)
    sim = None
    try:
        added = [cluster.add_node(**spec) for spec in nodes]  # cluster.worker_nodes is an unordered set
        cluster.wait_for_nodes()
        all_nodes = [cluster.head_node, *added]
        sim = SimCluster(
            cluster=cluster,
            dashboard_url="http://" + cluster.webui_url,
            metrics_urls=[f"http://{n.node_ip_address}:{n.metrics_export_port}/metrics" for n in all_nodes],
            node_ids=[n.node_id for n in all_nodes],
            startup_s=0.0,
        )
        if connect:
            ray.init(address=cluster.address)
            sim.connected = True
        _wait_ready(sim, ready_timeout_s)
        sim.startup_s = time.monotonic() - t0
        return sim
    except BaseException:
        if sim is not None:
            sim.shutdown()
        else:
            cluster.shutdown()
        raise


def _wait_ready(sim: SimCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(sim.metrics_urls)
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        for url in list(pending):
            try:
                _get(url, 5.0)
                pending.remove(url)
            except OSError as e:
                last_err = e
        if not pending:
            try:
                list_actors_http(sim.dashboard_url, timeout_s=5.0)
                return
            except (OSError, RuntimeError) as e:
                last_err = e
        time.sleep(0.25)
    raise TimeoutError(f"simulated cluster not ready after {timeout_s} s: {pending or sim.dashboard_url}: {last_err}")


def _get(url: str, timeout_s: float, headers: dict | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.read()


def metrics_text(urls: Iterable[str], timeout_s: float = 5.0) -> str:
    """Prometheus text of all ``urls`` joined by newlines (a node that does not answer raises)."""
    return "\n".join(_get(u, timeout_s).decode("utf-8", "replace") for u in urls)


def list_actors_http(
    dashboard_url: str,
    *,
    detail: bool = False,
    limit: int = 1000,
    timeout_s: float = 10.0,
    token: str | None = None,
) -> list[dict]:
    """Actors from the dashboard's state API ``GET /api/v0/actors`` (what ``ray list actors`` uses).

    Each dict has at least ``actor_id``, ``class_name``, ``state`` ("ALIVE", "DEAD", ...), ``name``
    ("" if unnamed), ``job_id``, ``node_id``, ``pid``, ``ray_namespace``. ``token`` is only needed
    when the cluster runs with token auth (sent as ``Authorization: Bearer <token>``).
    """
    query = urllib.parse.urlencode({"limit": limit, "detail": str(bool(detail)).lower(), "timeout": int(timeout_s)})
    url = dashboard_url.rstrip("/") + "/api/v0/actors?" + query
    headers = {"Authorization": "Bearer " + token} if token else {}
    try:
        body = json.loads(_get(url, timeout_s, headers))
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise RuntimeError(f"{url}: HTTP {e.code}, token auth is on (set RAY_AUTH_MODE=disabled)") from e
        raise
    if not body.get("result"):
        raise RuntimeError(f"{url}: {body.get('msg')}")
    return body["data"]["result"]["result"]
