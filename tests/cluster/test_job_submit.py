"""`ray job submit` of the PPO launcher to a real head started with `ray start --head` (issue 19).

What docs/cluster.md#ray-job-submit tells a user to do, run as they would: a head in its own temp
dir with Ray's token auth on (a private token file, `RAY_AUTH_TOKEN_PATH`), the repository as the
job's working dir, the launcher without `--address` (a job's driver gets `RAY_ADDRESS` from Ray and
must join the cluster, not start its own Ray). The head is `ray start --block` in its own session:
ending that process ends exactly this Ray (`ray stop` would end every Ray of this user).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's: `ray` here, and the job's `python` through PATH
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT: the jobs API and `ray job --address`
    token: str
    env: dict  # what a user's shell holds: token mode and where the token is
    log: Path

    def api(self, path: str, token: str | None = None) -> object:
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.dashboard + path, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=ROOT)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="coati_rj_"))  # short: Ray's socket paths live under it
    token_file = tmp / "auth_token"
    token = secrets.token_hex(32)  # the form `ray get-auth-token --generate` writes
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    # Every port a head opens at a fixed default is given a free one: another Ray on this machine (a
    # user's, another test's) may hold 6379, 8265, 10001 or the dashboard agent's 52365, and a head whose
    # agent cannot listen answers every submission "No available agent to submit job".
    gcs_port, dash_port, agent_port, client_port = free_ports(4)
    log = tmp / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash_port}", f"--dashboard-agent-listen-port={agent_port}",
             f"--ray-client-server-port={client_port}", "--num-cpus=8", f"--temp-dir={tmp / 'ray'}",
             "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash_port}", token, env, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                h.api("/api/version")
                socket.create_connection(("127.0.0.1", agent_port), timeout=5).close()  # jobs go through it
                break
            except (OSError, ValueError) as e:
                assert time.monotonic() < deadline, f"the head's dashboard did not answer in 120 s: {e}\n" \
                                                    f"{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield h
    finally:
        _stop(proc, tmp)


def _stop(proc: subprocess.Popen, tmp: Path) -> None:
    """SIGTERM to `ray start --block` ends the processes it started (Ray's own handler); what outlives it
    (agents, the job's workers) is ended by the reaper's scan of exactly this session's directory."""
    import psutil
    import ray

    from coati_ray.cluster.reaper import end_session

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    ray_dir = os.path.dirname(os.path.abspath(ray.__file__))
    for session in (tmp / "ray").glob("session_2*"):
        end_session(psutil, str(session), ray_dir, exclude={os.getpid()})
    shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_runs_ppo_on_the_cluster(head, micro_model, tmp_path):
    # token auth is on and consistent: the jobs API refuses a request without the token
    with pytest.raises(urllib.error.HTTPError) as refused:
        head.api("/api/jobs/", token="")
    assert refused.value.code == 401

    job_id = "coati-ppo-" + secrets.token_hex(4)
    save = tmp_path / "ppo"
    submit = head.ray("job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--working-dir", ".",
                      "--no-wait", "--", "python", "launchers/ppo_cluster.py", "--pretrain", micro_model, "--rm_path",
                      micro_model, "--actors", "1", "--max_steps", "2", "--experience_batch_size", "8",
                      "--train_batch_size", "8", "--max_new_tokens", "8", "--save_path", str(save))
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert f"Job '{job_id}' submitted successfully" in submit.stdout + submit.stderr

    deadline, status = time.monotonic() + 300, None
    while status not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after 300 s"
        status = head.api(f"/api/jobs/{job_id}")["status"]
        time.sleep(1)
    logs = head.ray("job", "logs", "--address", head.dashboard, job_id)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert status == "SUCCEEDED", logs.stdout[-4000:]

    # the driver joined this cluster (Ray's RAY_ADDRESS), and the launcher's lines came back
    out = logs.stdout
    assert "coati_ray.cluster.ray_env: joining Ray cluster at" in out
    assert "starting a local Ray" not in out
    assert "step 2/2 | reward" in out
    assert "PPO done: 2 steps" in out and f"policy saved to {save}" in out
    assert (save / "model.safetensors").exists()

    # the dashboard's jobs API lists it, and so does `ray job list`
    listed = {j["submission_id"]: j for j in head.api("/api/jobs/")}
    assert listed[job_id]["status"] == "SUCCEEDED"
    assert listed[job_id]["entrypoint"].startswith("python launchers/ppo_cluster.py --pretrain")
    status_cli = head.ray("job", "status", "--address", head.dashboard, job_id)
    assert f"Job '{job_id}' succeeded" in status_cli.stdout + status_cli.stderr
