"""Run Prometheus over a Ray cluster's metrics, so the Ray dashboard's Metrics view and Grafana have
time series of our `ray_coati_*` gauges (reward, KL, losses, buffer, staleness, ...).

    sudo apt-get install prometheus                  # the system package; nothing is downloaded here
    RAY_PROMETHEUS_HOST=http://127.0.0.1:9090 ray start --head    # the dashboard reads Prometheus there
    coati prometheus                                  # on the head node; Ctrl-C stops it
    coati prometheus --port 9091 --data_dir /data/prom --scrape_interval 15

It scrapes every node Ray lists in <ray temp dir>/prom_metrics_service_discovery.json. For Grafana,
import deploy/grafana/coati_ray.json (docs/cluster.md, "Metrics").
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from coati_ray.cli import parse, run_main, setup_logging
from coati_ray.config import _help
from coati_ray.errors import ConfigError


@dataclass
class PrometheusArgs:
    """Where Prometheus listens and keeps its data, and which Ray cluster it scrapes."""

    port: int = _help("Port of Prometheus's web UI and HTTP API (127.0.0.1 only).", default=9090)
    data_dir: str = _help("Prometheus's configuration and time-series data.", default="outputs/prometheus")
    ray_temp_dir: str = _help("Ray's temp directory (ray start --temp-dir), which holds the list of nodes to "
                              "scrape.", default="/tmp/ray")
    scrape_interval: float = _help("Seconds between scrapes.", default=5.0)

    def validate(self) -> None:
        if self.scrape_interval <= 0:
            raise ConfigError("scrape_interval", f"must be > 0, got {self.scrape_interval}")


def main(argv=None) -> int:
    setup_logging()
    (args,), _ = parse([PrometheusArgs], argv, "Run Prometheus over the Ray cluster's metrics (ray_coati_*).")
    args.validate()
    from coati_ray.monitoring import SD_FILE, start_prometheus

    sd = Path(args.ray_temp_dir) / SD_FILE
    if not sd.exists():
        raise ConfigError("ray_temp_dir", f"{sd} does not exist: start Ray on this node first (ray start --head), "
                          "or pass the --temp-dir it was started with")
    proc = start_prometheus(sd, args.data_dir, args.port, args.scrape_interval)
    print(f"prometheus: http://127.0.0.1:{args.port} scraping the nodes in {sd} every {args.scrape_interval:g} s "
          f"(data in {args.data_dir}); the Ray dashboard shows its charts when Ray was started with "
          f"RAY_PROMETHEUS_HOST=http://127.0.0.1:{args.port}. Ctrl-C stops it.", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
