"""Prometheus and Grafana for a coati_ray job: the time series behind the Ray dashboard's Metrics view.

Every Ray node's metrics agent serves Prometheus text, our job's gauges among it as `ray_coati_*`
(coati_ray/cluster/control.py). Ray writes the list of those endpoints to
`<ray temp dir>/prom_metrics_service_discovery.json` (the latest session's; each session's own copy is
in its session directory). `coati prometheus` writes a Prometheus configuration that reads that list
and runs the `prometheus` binary from the system's package (Debian/Ubuntu: `apt-get install
prometheus`), not a download. `grafana_dashboard()` is the Grafana dashboard of our gauges, shipped as
deploy/grafana/coati_ray.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from coati_ray.errors import ConfigError

SD_FILE = "prom_metrics_service_discovery.json"
DASHBOARD_UID = "coati-ray-ppo"


def prometheus_config(sd_file: str | Path, scrape_interval_s: float = 5.0) -> str:
    """prometheus.yml scraping every node Ray lists in `sd_file` (re-read as nodes come and go)."""
    every = f"{round(scrape_interval_s * 1000)}ms"  # Prometheus durations take whole numbers only
    return (f"global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\n"
            f"scrape_configs:\n- job_name: ray\n  file_sd_configs:\n  - files: ['{sd_file}']\n"
            f"    refresh_interval: {every}\n")


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise ConfigError("prometheus", "the prometheus binary is not on PATH: install the system package "
                          "(Debian/Ubuntu: sudo apt-get install prometheus; macOS: brew install prometheus)")
    return found


def start_prometheus(sd_file: str | Path, data_dir: str | Path, port: int = 9090,
                     scrape_interval_s: float = 5.0) -> subprocess.Popen:
    """Write `data_dir/prometheus.yml` and start Prometheus on `port`; returns the process once it answers."""
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "prometheus.yml").write_text(prometheus_config(sd_file, scrape_interval_s))
    with open(data / "prometheus.log", "wb") as log:  # the child keeps its own copy of the file
        proc = subprocess.Popen([prometheus_binary(), f"--config.file={data / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={data / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/-/ready", time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            last = (data / "prometheus.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"prometheus exited with {proc.returncode}: {' '.join(last)} "
                               f"(all of it: {data / 'prometheus.log'})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError(f"prometheus did not answer {url} within 30 s; see {data / 'prometheus.log'}")
        time.sleep(0.2)


def query(prometheus_url: str, expr: str) -> list[dict]:
    """The result vector of an instant query through Prometheus's HTTP API (`/api/v1/query`)."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"prometheus query {expr!r}: {body}")
    return body["data"]["result"]


def grafana_dashboard() -> dict:
    """A Grafana dashboard (schema 39) with one time-series panel per coati gauge, by job, on the
    Prometheus data source chosen when importing it. Our gauges' `job` tag reaches Prometheus as
    `exported_job`: its own `job` label names the scrape job ("ray")."""
    from coati_ray.cluster.control import GAUGES

    panels = []
    for i, (name, (key, desc)) in enumerate(GAUGES.items()):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": key, "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": 8 * (i // 3)},
            "targets": [{"refId": "A", "expr": f'ray_{name}{{exported_job=~"$job"}}',
                         "legendFormat": "{{exported_job}}"}],
            "fieldConfig": {"defaults": {"unit": "s" if key.startswith("timing/") else "short"}, "overrides": []},
        })
    return {
        "uid": DASHBOARD_UID, "title": "coati_ray PPO", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["coati_ray", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "job", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(ray_coati_weight_version, exported_job)", "includeAll": True, "multi": True,
             "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "panels": panels,
    }
