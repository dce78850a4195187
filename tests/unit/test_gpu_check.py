"""scripts/gpu_check.sh, the one prepared GPU script, run here as a dry run (GPU_CHECK_ON_CPU=1).

It cannot run its GPU tests on these machines, so these tests keep the script itself working: it
lists every collected test with its outcome, and a time budget that runs out leaves the remaining
tests listed as "not run" with a failing exit status, never silently missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(tmp_path, *suites, **env):
    run_env = {**os.environ, "GPU_CHECK_ON_CPU": "1", "PYTHON": sys.executable, "OUT": str(tmp_path), **env}
    p = subprocess.run(["bash", "scripts/gpu_check.sh", *suites], cwd=ROOT, env=run_env, capture_output=True,
                       text=True, timeout=300)
    table = p.stdout[p.stdout.index("\ntest "):]
    rows = {line.split()[0]: line.split()[1] + (" run" if line.split()[1] == "not" else "")
            for line in table.splitlines()[2:] if line.startswith("tests.")}
    return p.returncode, rows, table.strip().splitlines()[-1]


def test_the_dry_run_lists_every_gpu_test_as_skipped(tmp_path):
    rc, rows, summary = gpu_check(tmp_path)
    assert rc == 0
    assert "tests.gpu.test_cuda::test_ddp_and_fsdp_agree_over_nccl" in rows
    assert "tests.gpu.test_cuda::test_ppo_with_nccl_weight_sync_into_vllm" in rows
    assert set(rows.values()) == {"skipped"}
    assert summary == f"0 passed, 0 failed, 0 errors, {len(rows)} skipped, 0 not run"
    assert (tmp_path / "junit.xml").exists() and (tmp_path / "pytest.log").exists()


def test_tests_the_budget_leaves_out_are_listed_and_fail_the_check(tmp_path):
    """The session budget is checked between tests: after the first test, the rest are not run."""
    rc, rows, summary = gpu_check(tmp_path, "tests/unit/test_vllm_compat.py", BUDGET_S="0.001")
    assert rc != 0
    assert list(rows.values()) == ["passed", "not run", "not run", "not run"]
    assert summary == "1 passed, 0 failed, 0 errors, 0 skipped, 3 not run"
