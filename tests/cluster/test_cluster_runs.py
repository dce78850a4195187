"""PPO on a simulated multi-node cluster (one raylet per node, all on this machine).

Nodes: a head (dashboard, metrics), two rollout nodes ({"rollout": 1}) and two trainer nodes
({"trainer": 1}), as cluster.yaml makes them. Every run uses the micro model as policy, reward
model and critic: these tests are about where actors run and what survives, not about learning.

Runs go on in a background thread while the test looks at them from outside, the way a user
does: the dashboard's HTTP API, Ray's metrics endpoint, a headless browser, the job's control (in the buffer actor).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coati_ray.cluster.placement import HEAD_RESOURCE, ROLE_NODE, ROLLOUT, TRAINER
from coati_ray.ppo_config import PPOConfig

PROMPTS, SAMPLES = 4, 2  # per step: 8 samples, ids [8 s, 8 s + 8)
ROOT = Path(__file__).resolve().parents[2]


def ppo_run(micro_model, save: Path, actors: int = 2, trainers: int = 2, **kw):
    from coati_ray.pipelines.ppo import run_ppo

    args = dict(rm_path=micro_model, experience_batch_size=PROMPTS, n_samples_per_prompt=SAMPLES, max_new_tokens=8,
                train_batch_size=4, max_steps=8, sync_check_interval=1, log_interval=1000, save_path=str(save))
    args.update(kw)
    return run_ppo(PPOConfig.of(pretrain=micro_model, actors=actors, placement="nodes", trainers=trainers,
                                cpus_per_trainer=1, **args), progress=False)


class Background:
    """Run `fn` in a thread; `result()` joins it and returns its value or raises its error."""

    def __init__(self, fn):
        self.value, self.error = None, None

        def target():
            try:
                self.value = fn()
            except BaseException as e:  # handed to the test thread
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout_s: float = 600):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        return self.value


def wait_for(predicate, what: str, run: Background | None = None, timeout_s: float = 300.0):
    """Poll `predicate` until it returns something truthy; fail if the run ended first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and not run.alive():
            run.result()  # raises the run's error, if any
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def control_status(ray):
    """The running job's status from its control (the buffer actor; None before it exists)."""
    from coati_ray.cluster.control import NAME

    try:
        actor = ray.get_actor(NAME)
        return ray.get(actor.get_status.remote())
    except (ValueError, ray.exceptions.RayActorError):
        return None


def at_step(ray, n: int):
    def check():
        s = control_status(ray)
        return s if s and s.get("state") == "running" and s["step"] >= n else None
    return check


def assert_every_sample_once(result, first_step: int = 0):
    """Each step trained on exactly its own 8 sample ids, each exactly once per epoch."""
    for s, (made, per_epoch) in enumerate(zip(result.made_ids, result.trained_ids), start=first_step):
        assert made == list(range(8 * s, 8 * s + 8)), f"step {s}"
        assert all(epoch == made for epoch in per_epoch), f"step {s}"


# --- one observed run: placement, dashboard, metrics, browser ------------------------------------------

@pytest.fixture(scope="module")
def observed(sim, micro_model, tmp_path_factory):
    """A run watched from outside while it goes on; it is stopped through the control actor once
    everything was seen (so the observation never races the end of the run)."""
    from coati_ray.cluster.control import request_stop
    from coati_ray.testing.simulated_cluster import list_actors_http, metrics_text

    from .browser import chromium_path, render_dom, screenshot

    ray = sim.ray
    prom = start_prometheus_for(sim, tmp_path_factory.mktemp("prometheus"))
    run = Background(lambda: ppo_run(micro_model, tmp_path_factory.mktemp("observed"), max_steps=200))
    wait_for(at_step(ray, 2), "step 2", run)
    names = ["generator-0", "generator-1", "reference-0", "reward-0", "trainer-0", "trainer-1", "critic-0",
             "buffer-0"]  # buffer-0 also holds the job's control

    def all_alive():
        alive = {a.get("name") for a in list_actors_http(sim.dashboard_url) if a.get("state") == "ALIVE"}
        return alive if set(names) <= alive else None

    seen = {"actors": wait_for(all_alive, "every role actor alive in the dashboard API", run)}

    def metrics_with_version():
        values = parse_metrics(metrics_text(sim.metrics_urls))
        return values if values.get("coati_weight_version", 0) >= 2 else None

    seen["metrics"] = wait_for(metrics_with_version, "our metrics on the metrics endpoint", run)
    if prom:
        try:
            seen["prometheus"] = wait_for(lambda: prometheus_view(prom[1]), "ray_coati_* in Prometheus", run, 120)
        finally:
            prom[0].terminate()
            prom[0].wait(timeout=30)
    if chromium_path():
        url = f"{sim.dashboard_url}/#/actors"
        seen["dom"] = render_dom(url, timeout_s=60)
        out = Path(os.environ.get("COATI_TEST_ARTIFACTS", tmp_path_factory.mktemp("shots")))
        out.mkdir(parents=True, exist_ok=True)
        screenshot(url, str(out / "dashboard_actors.png"), timeout_s=60)
        seen["png"] = out / "dashboard_actors.png"
    request_stop(namespace=ray.get_runtime_context().namespace)
    seen["result"] = run.result()
    seen["nodes"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    return seen


def start_prometheus_for(sim, data_dir: Path):
    """Debian's prometheus (if installed) on the sim cluster's service-discovery file, as `coati prometheus`
    runs it, scraping every second: (process, URL), or None without the binary."""
    import shutil

    from coati_ray.monitoring import SD_FILE, start_prometheus

    if not shutil.which("prometheus"):
        return None
    port = free_port()
    return start_prometheus(Path(sim.session_dir) / SD_FILE, data_dir, port, scrape_interval_s=1), \
        f"http://127.0.0.1:{port}"


def prometheus_view(url: str) -> dict | None:
    """Once Prometheus has scraped our gauges at weight version >= 2: every Grafana panel's query result."""
    from coati_ray.monitoring import grafana_dashboard, query

    if not any(float(r["value"][1]) >= 2 for r in query(url, "ray_coati_weight_version")):
        return None
    return {p["title"]: query(url, p["targets"][0]["expr"].replace("$job", ".*"))
            for p in grafana_dashboard()["panels"]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Our gauges from Prometheus text (`ray_coati_x{...} v` -> {"coati_x": v}); the last value wins."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            if name.startswith("coati_"):
                out[name] = sample.value
    return out


def test_roles_land_only_on_their_node_types(observed):
    placement, nodes = observed["result"].placement, observed["nodes"]
    kinds = {ROLLOUT: set(), TRAINER: set()}
    for name, node in placement.items():
        role = name.rsplit("-", 1)[0]
        if role in ROLE_NODE:
            marker = ROLE_NODE[role]
            other = TRAINER if marker == ROLLOUT else ROLLOUT
            assert marker in nodes[node] and other not in nodes[node], f"{name} on {nodes[node]}"
            kinds[marker].add(node)
        else:  # buffer-0 (and with it the job's control) stays on the head node
            assert HEAD_RESOURCE in nodes[node], f"{name} on {nodes[node]}"
    # generators are spread over both rollout nodes; the two trainer ranks are packed onto one node
    assert placement["generator-0"] != placement["generator-1"]
    assert placement["trainer-0"] == placement["trainer-1"]
    assert len(kinds[ROLLOUT]) == 2


def test_the_dashboard_lists_every_role_actor_alive_during_the_run(observed):
    alive = observed["actors"]
    for name in ("generator-0", "generator-1", "reference-0", "reward-0", "trainer-0", "trainer-1", "critic-0",
                 "buffer-0"):
        assert name in alive
    assert "control" not in alive  # the buffer is the job's control: no process of its own


def test_the_metrics_endpoint_shows_our_metrics_with_plausible_values(observed):
    m = observed["metrics"]
    assert 2 <= m["coati_weight_version"] <= 200
    assert m["coati_generators"] == 2
    assert 0 <= m["coati_buffer_fill"] <= 8  # on-policy: the buffer holds at most one step
    assert m["coati_sample_staleness"] == 0
    assert m["coati_step_time_s"] > 0 and m["coati_rollout_tokens_per_s"] > 0
    assert 0 <= m["coati_generator_wait_weights_share"] <= 1 and 0 <= m["coati_generator_wait_buffer_share"] <= 1
    for name in ("coati_reward_mean", "coati_kl_mean", "coati_policy_loss", "coati_value_loss"):
        assert math.isfinite(m[name]), name


def test_prometheus_scrapes_our_gauges_and_every_grafana_panel_query_returns_the_job(observed):
    if "prometheus" not in observed:
        if os.environ.get("COATI_REQUIRE_PROMETHEUS"):
            pytest.fail("COATI_REQUIRE_PROMETHEUS is set but no prometheus binary was found")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    from coati_ray.cluster.control import GAUGES

    panels = observed["prometheus"]
    assert sorted(panels) == sorted(key for key, _ in GAUGES.values())
    for title, result in panels.items():
        assert result, f"panel {title}: no series"
        assert {r["metric"]["exported_job"] for r in result} == {result[0]["metric"]["exported_job"]}, title
        assert all(math.isfinite(float(r["value"][1])) for r in result), title
    assert {r["metric"]["__name__"] for r in panels["reward/mean"]} == {"ray_coati_reward_mean"}
    assert float(panels["generators/pooled"][0]["value"][1]) == 2


def test_a_headless_browser_shows_the_role_actors_in_the_dashboard(observed):
    if "dom" not in observed:
        if os.environ.get("COATI_REQUIRE_CHROMIUM"):
            pytest.fail("COATI_REQUIRE_CHROMIUM is set but no chromium was found")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    for name in ("generator-0", "generator-1", "trainer-0", "critic-0", "reward-0", "reference-0", "buffer-0"):
        assert name in observed["dom"], name
    png = observed["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_stopped_run_saves_as_at_the_end(observed):
    r = observed["result"]
    steps = len(r.history)
    assert 2 <= steps < 200
    summary = json.loads((Path(r.save_path) / "ppo_summary.json").read_text())
    assert summary["steps"] == steps and (Path(r.save_path) / "checkpoints" / f"step_{steps}").is_dir()
    assert_every_sample_once(r)


# --- scaling rollout at run time -------------------------------------------------------------------------

def test_generators_are_added_and_removed_while_training_runs(sim, micro_model, tmp_path):
    from coati_ray.cluster.control import request_generators, request_stop

    ray, ns = sim.ray, sim.ray.get_runtime_context().namespace
    run = Background(lambda: ppo_run(micro_model, tmp_path / "scale", actors=1, max_steps=200))
    wait_for(at_step(ray, 2), "step 2", run)
    # Scale up with the command a user runs, joining the cluster from another process.
    env = {**os.environ, "RAY_ADDRESS": sim.address}
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "control.py"), "--generators", "3",
                        "--namespace", ns], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["target"] == 3
    up = wait_for(lambda: (s := control_status(ray)) and s.get("pooled") == 3 and s, "3 pooled generators", run)
    wait_for(at_step(ray, up["step"] + 2), "two steps with 3 generators", run)
    request_generators(1, namespace=ns)  # and down, through the API
    down = wait_for(lambda: (s := control_status(ray)) and s.get("pooled") == 1 and s, "1 pooled generator", run)
    wait_for(at_step(ray, down["step"] + 2), "two steps with 1 generator", run)
    request_stop(namespace=ns)
    r = run.result()
    by_step = [sorted(set(g)) for g in r.made_by]
    assert by_step[0] == [0]
    assert any(len(g) == 3 for g in by_step), by_step  # three generators shared a step
    assert len(by_step[-1]) == 1, by_step  # the last steps ran on one
    assert_every_sample_once(r)  # no sample lost or trained twice across the changes
    last = r.history[-1]
    assert last["buffer/generators_added"] == 2 and last["buffer/generators_retired"] == 2


# --- fault tolerance -------------------------------------------------------------------------------------

def actor_restarts(ray, name: str) -> int:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")], detail=True)
    return max((a.num_restarts for a in alive), default=-1)


def test_chaos_generator_and_reward_crashes_lose_and_repeat_nothing(sim, micro_model, tmp_path):
    """Seeded and bounded: kill a generator and the reward actor, each once, at random steps."""
    ray = sim.ray
    rng = random.Random(1234)
    plan = sorted([(rng.randint(1, 5), f"generator-{rng.randint(0, 1)}"), (rng.randint(1, 5), "reward-0")])
    run = Background(lambda: ppo_run(micro_model, tmp_path / "chaos", actors=2, max_steps=8))
    for step, name in plan:
        wait_for(at_step(ray, step), f"step {step}", run)
        ray.kill(ray.get_actor(name), no_restart=False)  # a crash: Ray restarts it
        wait_for(lambda n=name: actor_restarts(ray, n) >= 1, f"{name} restarted", run)
    r = run.result()
    assert len(r.history) == 8
    assert_every_sample_once(r)
    # restarted generators re-synced: every step's sync check still agrees to float noise
    assert max(m["sync/logprob_max_diff"] for m in r.history) < 1e-4
    last = r.history[-1]
    assert last["buffer/accepted"] == last["buffer/taken"] == 8 * 8


def test_a_dead_trainer_stops_the_run_at_a_checkpoint_and_resume_auto_continues(sim, micro_model, tmp_path):
    from coati_ray.errors import RunStopped

    ray = sim.ray
    save = tmp_path / "trainer_dies"
    run = Background(lambda: ppo_run(micro_model, save, max_steps=6, ckpt_interval=2))
    wait_for(at_step(ray, 3), "step 3", run)
    ray.kill(ray.get_actor("trainer-1"))  # trainers are not restarted: their optimizer state is gone
    with pytest.raises(RunStopped) as stopped:
        run.result()
    message = str(stopped.value)
    assert "trainer-1 died" in message and "--resume auto" in message
    ckpts = sorted(int(p.name.split("_")[1]) for p in (save / "checkpoints").glob("step_*") if p.suffix != ".tmp")
    assert ckpts and f"step_{ckpts[-1]}" in message
    resumed = ppo_run(micro_model, save, max_steps=6, ckpt_interval=2, resume="auto")
    assert resumed.start_step == ckpts[-1] and len(resumed.history) == 6 - ckpts[-1]
    assert_every_sample_once(resumed, first_step=ckpts[-1])
