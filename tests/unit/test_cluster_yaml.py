"""cluster.yaml (AWS) and cluster-local.yaml (on-premises): valid for Ray's cluster launcher, and in
line with coati_ray/cluster/placement.py. Nothing here starts Ray or reaches a cloud.

Validation is what `ray up` runs before it touches a provider: `prepare_config` (merges the
provider's defaults.yaml, a file shipped with Ray; the local provider's own preparation) and
`validate_config` (ray-schema.json plus cross-field rules). Neither needs boto3 nor credentials:
those come later, in the AWS provider's `bootstrap_config` and instance-type detection.

The start commands are run for real under bash, with a stub `ray` on PATH that records its
arguments and the RAY_AUTH_MODE it sees, so the tests check what each node would start.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coati_ray.cluster.placement import ROLE_NODE, ROLLOUT, TRAINER

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
MARKERS = set(ROLE_NODE.values())
# Resources Ray itself gives a node (detected or implicit); everything else is a custom marker.
RAY_OWN = {"CPU", "GPU", "memory", "object_store_memory"}

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def all_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from all_strings(k)
            yield from all_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from all_strings(v)


def run_start_commands(commands: list[str], tmp_path: Path, host_ip: str) -> list[dict]:
    """Run `commands` as Ray's updater would on a node whose address is `host_ip`; return each
    `ray` invocation as {"argv": [...], "auth": RAY_AUTH_MODE or None}."""
    from ray.autoscaler._private.util import with_head_node_ip

    bin_dir = tmp_path / f"bin-{host_ip}"
    bin_dir.mkdir()
    log = tmp_path / f"ray-{host_ip}.jsonl"
    (bin_dir / "ray").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'auth': os.environ.get('RAY_AUTH_MODE')}) + '\\n')\n")
    (bin_dir / "hostname").write_text(f"#!/bin/sh\necho '{host_ip} '\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for cmd in with_head_node_ip(commands, "10.9.9.9"):
        subprocess.run(["bash", "-c", cmd], env=env, check=True, capture_output=True, timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def ray_start(calls: list[dict]) -> dict:
    starts = [c for c in calls if c["argv"][:1] == ["start"]]
    assert len(starts) == 1, f"expected one `ray start`, got {calls}"
    return starts[0]


def flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def markers_of(argv: list[str]) -> set[str]:
    given = flag(argv, "--resources")
    return set(json.loads(given)) - RAY_OWN if given else set()


# (a) Ray's own validator accepts both files -------------------------------------------------


def test_aws_config_passes_ray_validation():
    prepared = ray_validate(load(AWS))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", ROLLOUT, TRAINER}


def test_local_config_passes_ray_validation():
    from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE

    raw = load(LOCAL)
    prepared = ray_validate(raw)
    assert prepared["provider"]["type"] == "local"
    # The local provider makes its single node type; every listed worker is kept up.
    node_type = prepared["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])


# (d) ... and that validator does reject broken configs, so (a) means something


def _misspell_top_key(c):
    c["worker_start_ray_command"] = c.pop("worker_start_ray_commands")


def _fractional_marker(c):
    c["available_node_types"][ROLLOUT]["resources"] = {ROLLOUT: 0.5}


def _unknown_head_type(c):
    c["head_node_type"] = "haed"


def _min_over_max(c):
    c["available_node_types"][TRAINER]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [_misspell_top_key, _fractional_marker, _unknown_head_type, _min_over_max])
def test_ray_validation_rejects_broken_aws_config(breakage):
    import jsonschema

    config = load(AWS)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_local_provider_refuses_node_types():
    """Why cluster-local.yaml gives its markers on the `ray start` command line."""
    import click

    config = load(LOCAL)
    config["available_node_types"] = load(AWS)["available_node_types"]
    with pytest.raises(click.ClickException, match="not supported for on-premise"):
        ray_validate(config)


# (b) the markers are exactly the ones placement.py asks for -------------------------------


def test_aws_node_types_provide_exactly_the_placement_markers():
    config = load(AWS)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert not (set(types[head]["resources"]) & MARKERS), "roles with a marker must not land on the head"
    provided = {}
    for name, t in types.items():
        if name == head:
            continue
        custom = set(t["resources"]) - RAY_OWN
        assert len(custom) == 1, f"node type {name} should carry one marker, has {custom}"
        marker = custom.pop()
        assert t["resources"][marker] >= 1, f"{name}: capacity 1 holds 1000 actors of MARKER_AMOUNT"
        assert t.get("max_workers", 0) >= 1, f"{name} can never start, so its roles never place"
        provided[marker] = name
    assert set(provided) == MARKERS, f"node types give {set(provided)}, placement asks for {MARKERS}"


def test_aws_worker_counts_are_consistent():
    config = load(AWS)
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert config["max_workers"] == sum(t["max_workers"] for t in workers)


def test_setup_commands_install_existing_extras():
    """Rollout nodes get the vllm extra; every extra named is one pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])

    def extras(commands):
        found = [m.group(1) for c in commands for m in re.finditer(r"scripts/setup\.sh(?:[ \t]+([\w,-]+))?", c)]
        assert found, f"no scripts/setup.sh in {commands}"
        return {e for group in found if group for e in group.split(",")}

    aws = load(AWS)
    rollout = extras(aws["available_node_types"][ROLLOUT]["worker_setup_commands"])
    assert "vllm" in rollout
    local = load(LOCAL)
    assert "vllm" in extras(local["worker_setup_commands"])
    named = (rollout | extras(aws["available_node_types"][TRAINER]["worker_setup_commands"])
             | extras(aws["setup_commands"]) | extras(local["head_setup_commands"]))
    assert named <= defined


def test_cluster_installs_the_ray_of_this_machine():
    """`ray up` refuses a cluster whose Ray differs from the launching one (validate_config)."""
    import ray

    for path in (AWS, LOCAL):
        pins = set(re.findall(r"\bray==([\w.]+)", "\n".join(all_strings(load(path)))))
        assert pins == {ray.__version__}, f"{path.name} pins {pins}"


@needs_bash
def test_local_workers_start_with_one_marker_each_and_all_markers_covered(tmp_path):
    config = load(LOCAL)
    seen = set()
    for ip in config["provider"]["worker_ips"]:
        start = ray_start(run_start_commands(config["worker_start_ray_commands"], tmp_path, ip))
        assert flag(start["argv"], "--address") == "10.9.9.9:6379"
        got = markers_of(start["argv"])
        assert len(got) == 1 and got <= MARKERS, f"worker {ip} starts with markers {got}"
        seen |= got
    assert seen == MARKERS, f"workers provide {seen}, placement asks for {MARKERS}"
    head = ray_start(run_start_commands(config["head_start_ray_commands"], tmp_path, config["provider"]["head_ip"]))
    assert not markers_of(head["argv"]) & MARKERS


# (c) dashboard on localhost, token auth on ------------------------------------------------


@needs_bash
@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_head_starts_ray_with_local_dashboard_and_token_auth(path, tmp_path):
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT

    config = load(path)
    start = ray_start(run_start_commands(config["head_start_ray_commands"], tmp_path, "10.9.9.9"))
    argv = start["argv"]
    assert "--head" in argv
    assert flag(argv, "--dashboard-host") == "127.0.0.1"
    # `ray dashboard cluster.yaml` forwards this port unless told otherwise.
    assert int(flag(argv, "--dashboard-port") or DEFAULT_DASHBOARD_PORT) == DEFAULT_DASHBOARD_PORT
    assert flag(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    assert start["auth"] == "token"


@needs_bash
@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_workers_join_with_token_auth_and_the_token_reaches_every_node(path, tmp_path):
    config = load(path)
    start = ray_start(run_start_commands(config["worker_start_ray_commands"], tmp_path, "10.9.9.8"))
    assert start["auth"] == "token"  # a worker's `ray start` only sends the token in token mode
    # Ray does not copy the token to nodes: the file mount does, to where Ray looks for it.
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_nothing_disables_token_auth_or_opens_the_dashboard(path):
    text = "\n".join(all_strings(load(path)))
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", text)
    assert not re.search(r"--dashboard-host[= ]['\"]?0\.0\.0\.0", text)
