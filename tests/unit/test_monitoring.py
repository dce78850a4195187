"""Prometheus over Ray's service-discovery file, and the Grafana dashboard we ship (deploy/grafana/)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from coati_ray.cluster.control import GAUGES
from coati_ray.commands.prometheus import main as prometheus_main
from coati_ray.errors import ConfigError
from coati_ray.monitoring import grafana_dashboard, prometheus_config, query, start_prometheus

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_grafana_dashboard_is_the_generated_one_with_a_panel_per_gauge():
    shipped = json.loads((ROOT / "deploy" / "grafana" / "coati_ray.json").read_text())
    assert shipped == grafana_dashboard()  # regenerate: python -c "from coati_ray.monitoring import ..." (docs)
    exprs = [p["targets"][0]["expr"] for p in shipped["panels"]]
    assert exprs == [f'ray_{name}{{exported_job=~"$job"}}' for name in GAUGES]
    assert [p["title"] for p in shipped["panels"]] == [key for key, _ in GAUGES.values()]
    positions = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in shipped["panels"]}
    assert len(positions) == len(GAUGES)  # no two panels on top of each other


def test_the_prometheus_config_reads_rays_node_list():
    cfg = yaml.safe_load(prometheus_config("/tmp/ray/session_x/prom_metrics_service_discovery.json", 2))
    assert cfg["global"]["scrape_interval"] == "2000ms"
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "ray"
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/session_x/prom_metrics_service_discovery.json"],
                                       "refresh_interval": "2000ms"}]


def test_coati_prometheus_without_a_ray_node_list_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"--ray_temp_dir: {tmp_path}/prom_metrics_service_discovery.json does not "
                                          "exist: start Ray on this node first"):
        prometheus_main(["--ray_temp_dir", str(tmp_path), "--data_dir", str(tmp_path / "prom")])


def need_prometheus() -> None:
    if not shutil.which("prometheus"):
        if os.environ.get("COATI_REQUIRE_PROMETHEUS"):
            pytest.fail("COATI_REQUIRE_PROMETHEUS is set but no prometheus binary was found")
        pytest.skip("no prometheus binary (apt-get install prometheus)")


def test_prometheus_scrapes_the_targets_in_the_service_discovery_file(tmp_path):
    """A metrics endpoint like a Ray node's, listed in a service-discovery file like Ray's."""
    need_prometheus()
    body = b'# TYPE ray_coati_reward_mean gauge\nray_coati_reward_mean{job="ppo-1",Component="core_worker"} 0.75\n'

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sd = tmp_path / "prom_metrics_service_discovery.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{server.server_address[1]}"]}]))
    port = free_port()
    proc = start_prometheus(sd, tmp_path / "prom", port, scrape_interval_s=0.5)
    try:
        deadline, result = time.monotonic() + 30, []
        while not result:
            assert time.monotonic() < deadline, "Prometheus did not scrape the listed target within 30 s"
            result = query(f"http://127.0.0.1:{port}", 'ray_coati_reward_mean{exported_job="ppo-1"}')
            time.sleep(0.2)
        (series,) = result
        assert float(series["value"][1]) == 0.75
        assert series["metric"]["job"] == "ray" and series["metric"]["exported_job"] == "ppo-1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.shutdown()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released again for Prometheus to bind)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
