"""Dockerfile, .dockerignore and deploy/rayjob.yaml (KubeRay) against the project they package (issue 19).

Nothing here builds an image or reaches Kubernetes (no Docker daemon, no cluster on the test
machines): the files are parsed, their pins compared with the project's, their shell run through
`bash -n`, the RayJob's entrypoint parsed by the launcher's own parser, and the actors those flags
start (computed by coati_ray's placement code) packed onto the worker groups the manifest declares.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from coati_ray.cluster.placement import (
    HEAD_RESOURCE,
    MARKER_AMOUNT,
    ROLE_NODE,
    ROLLOUT,
    TRAINER,
    role_resources,
    trainer_bundles,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
RAYJOB = ROOT / "deploy" / "rayjob.yaml"


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + "\n"
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def docker_args() -> dict[str, str]:
    return dict(rest.partition("=")[::2] for word, rest in instructions() if word == "ARG")


def documented_tags() -> dict[str, str]:
    """variant -> image tag, from the `docker build -t TAG` lines of the Dockerfile's header."""
    tags = {}
    for m in re.finditer(r"docker build -t (\S+)( --build-arg VARIANT=(\w+))? \.", DOCKERFILE.read_text()):
        tags[m.group(3) or "cpu"] = m.group(1)
    return tags


def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_pins_match_the_project():
    args = docker_args()
    assert set(args) >= {"PYTHON_IMAGE", "VARIANT", "TORCH_SPEC", "RAY_VERSION", "EXTRAS"}
    assert args["VARIANT"] == "cpu"
    # torch: the pin scripts/setup.sh installs first (and the one vllm pins)
    setup_pins = set(re.findall(r"\$\{TORCH_SPEC:-([^}]+)\}", (ROOT / "scripts" / "setup.sh").read_text()))
    assert setup_pins == {args["TORCH_SPEC"]}, setup_pins
    # Ray: the version these tests run and cluster.yaml's nodes pin
    import ray

    assert args["RAY_VERSION"] == ray.__version__
    assert f"ray=={args['RAY_VERSION']}" in (ROOT / "cluster.yaml").read_text()
    # extras: each one pyproject.toml defines; the cuda variant's vllm pins a vllm release
    extras = pyproject()["project"]["optional-dependencies"]
    for name in args["EXTRAS"].split(",") + ["vllm"]:
        assert name in extras, f"Dockerfile EXTRAS names {name!r}, not an extra of pyproject.toml"
    assert re.fullmatch(r"vllm==[\d.]+", extras["vllm"][0])


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    assert {".git", ".venv", "outputs"} <= set(ignored)
    copies = [shlex.split(rest) for word, rest in instructions() if word == "COPY"]
    assert copies
    for argv in copies:
        sources = [a for a in argv[:-1] if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            blocked = [p for p in ignored if fnmatch.fnmatch(src.rstrip("/"), p)]
            assert not blocked, f"COPY {src} is excluded by .dockerignore {blocked}"
    # the install needs these in the image before `pip install -e`: the package and its metadata
    copied = {s for argv in copies for s in argv[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "README.md", "scripts/setup.sh", "coati_ray", "launchers"} <= copied


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dockerfile_shell_parses_and_rejects_an_unknown_variant():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert len(runs) >= 3
    for body in runs:
        p = subprocess.run(["bash", "-n", "-c", body], capture_output=True, text=True)
        assert p.returncode == 0, f"RUN does not parse:\n{body}\n{p.stderr}"
    # the first RUN checks VARIANT before installing anything (its case runs first)
    case = runs[0].split("apt-get update")[0]
    bad = subprocess.run(["bash", "-c", case], env={"VARIANT": "rocm", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "VARIANT must be cpu or cuda, got 'rocm'" in bad.stderr


def test_dockerfile_runs_as_a_user_with_ray_ports_and_a_command_that_exists():
    inst = instructions()
    users = [rest for word, rest in inst if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {int(p) for word, rest in inst if word == "EXPOSE" for p in rest.split()}
    assert {6379, 8265, 10001} <= exposed
    assert any(word == "WORKDIR" for word, _ in inst)
    cmd = json.loads(next(rest for word, rest in reversed(inst) if word == "CMD"))
    assert cmd[0] in pyproject()["project"]["scripts"]


def test_documented_tags_carry_the_project_version():
    tags = documented_tags()
    version = pyproject()["project"]["version"]
    assert tags == {"cpu": f"coati-ray:{version}-cpu", "cuda": f"coati-ray:{version}-cuda"}


# --- deploy/rayjob.yaml -------------------------------------------------------------------------


def test_rayjob_is_a_kuberay_rayjob_on_the_cuda_image_with_token_auth():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == docker_args()["RAY_VERSION"]
    assert spec["authOptions"] == {"mode": "token"}
    assert {c["image"] for c in containers(job)} == {documented_tags()["cuda"]}
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    for c in containers(job):  # requests = limits: KubeRay gives Ray the limits as --num-cpus / --num-gpus
        res = c["resources"]
        assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["limits"]), c["name"]


def parse_entrypoint(entrypoint: str):
    """The entrypoint's launcher and its flags through that launcher's parser (as `main` parses them)."""
    from coati_ray.cli import parse
    from coati_ray.ppo_config import PARTS, PPOConfig

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "launchers/ppo_cluster.py"], argv[:2]
    assert (ROOT / argv[1]).is_file()
    parts, extra = parse(list(PARTS.values()), argv[2:], "", positional=[("prompts", "")])
    cfg = PPOConfig(**dict(zip(PARTS, parts)))
    cfg.roles.validate()
    return cfg, extra


def groups(job: dict) -> list[dict]:
    """Each worker group's nodes as Ray sees them: {name, replicas, CPU, GPU, custom resources}."""
    out = []
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        # KubeRay writes `--resources=<value>` into the bash command that runs `ray start`: the shell's
        # quoting rules make the value one word, which must be a JSON object
        words = shlex.split(g["rayStartParams"].get("resources", "{}"))
        assert len(words) == 1, f"{g['groupName']}: rayStartParams.resources splits into {words}"
        out.append({"name": g["groupName"], "replicas": g["replicas"], "CPU": float(limits["cpu"]),
                    "GPU": float(limits.get("nvidia.com/gpu", 0)), **json.loads(words[0])})
    return out


def demands(cfg, available: dict[str, float]) -> list[tuple[str, dict[str, float]]]:
    """(role, resources) of every actor or placement-group bundle the run asks Ray for on worker nodes."""
    from coati_ray.algos import NEEDS_CRITIC
    from coati_ray.pipelines.ppo_roles import generator_placement

    roles, cluster = cfg.roles, cfg.cluster
    res = role_resources(roles, available)
    assert res["buffer"] == {HEAD_RESOURCE: MARKER_AMOUNT}  # on the head, which every Ray cluster marks
    out = []
    for i in range(roles.actors):
        opts = generator_placement(cfg, res.get("generator"))
        out.append(("generator", {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **(opts["resources"] or {})}))
    n_refs, n_rewards = roles.scoring_actors()
    out += [("reference", {"CPU": roles.reference_cpus, "GPU": roles.reference_gpus, **res["reference"]})] * n_refs
    out += [("reward", {"CPU": roles.reward_cpus, "GPU": roles.reward_gpus, **res["reward"]})] * n_rewards
    out += [("trainer", b) for b in trainer_bundles(cluster.trainers, cluster.cpus_per_trainer or 1.0,
                                                    cluster.gpus_per_trainer, res["trainer"])]
    if NEEDS_CRITIC[cfg.objective.advantage_estimator]:
        out += [("critic", b) for b in trainer_bundles(roles.critic_trainers, roles.critic_cpus, roles.critic_gpus,
                                                       res["critic"])]
    return out


def unplaced(asks: list[tuple[str, dict]], nodes: list[dict]) -> list[str]:
    """First-fit of each ask onto the nodes' free resources; the asks that fit nowhere."""
    free = [dict(n) for g in nodes for n in [g] * g["replicas"]]
    left = []
    for role, ask in sorted(asks, key=lambda a: -a[1].get("GPU", 0)):
        for node in free:
            if all(node.get(k, 0) >= v - 1e-9 for k, v in ask.items() if v):
                for k, v in ask.items():
                    node[k] = node.get(k, 0) - v
                break
        else:
            left.append(f"{role} {ask}")
    return left


def test_rayjob_entrypoint_flags_parse_and_every_actor_fits_its_node_type():
    job = rayjob()
    cfg, extra = parse_entrypoint(job["spec"]["entrypoint"])
    assert cfg.roles.placement == "nodes" and cfg.cluster.address == "auto"
    assert extra.prompts and cfg.run.save_path.startswith("/data/") and cfg.model.pretrain.startswith("/data/")
    nodes = groups(job)
    declared = {k: v for g in nodes for k, v in g.items() if k not in ("name", "replicas", "CPU", "GPU")}
    asks = demands(cfg, declared)
    # every marker a role asks for is one that a worker group declares
    names = {ROLLOUT: cfg.roles.rollout_resource, TRAINER: cfg.roles.trainer_resource}
    for role, ask in asks:
        marker = names[ROLE_NODE[role]]
        assert ask.get(marker) == MARKER_AMOUNT, (role, ask)
        assert any(g.get(marker) for g in nodes), f"no worker group declares {marker!r} ({role} actors ask for it)"
    assert {role for role, _ in asks} == {"generator", "reference", "reward", "trainer", "critic"}
    assert unplaced(asks, nodes) == []
    # the head runs no actor that needs CPUs and carries no marker: the buffer asks for 0 CPUs
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0" and "resources" not in head


def test_the_fit_check_fails_without_a_groups_marker_or_gpus():
    # the check above can fail: a rollout group that lost its marker, or trainer nodes with too few GPUs
    job = rayjob()
    cfg, _ = parse_entrypoint(job["spec"]["entrypoint"])
    nodes = groups(job)
    asks = demands(cfg, {"rollout": 1.0, "trainer": 1.0})
    no_marker = [{k: v for k, v in g.items() if k != "rollout"} for g in nodes]
    assert {a.split()[0] for a in unplaced(asks, no_marker)} == {"generator", "reference", "reward"}
    few_gpus = [dict(g, GPU=1.0) if g["name"] == "trainer" else g for g in nodes]
    assert {a.split()[0] for a in unplaced(asks, few_gpus)} >= {"trainer"}
