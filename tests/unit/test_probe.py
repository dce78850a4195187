"""The reliability probe (`scripts/probe.py`, docs/reliability.md) as the test suite runs it: `--quick`,
which writes a third of the probe's bad and tricky data files (.jsonl, .json, .csv, .tsv, .parquet, saved
datasets; SFT, RM and PPO columns) and loads each through the real `load_rows` with and without
skip_bad_rows, then gives bad flags to every launcher in a subprocess. Nothing is mocked.

Every case must end ok or as a clear error: no traceback, no hang, no row lost or changed (rows loaded +
rows skipped = rows written). About 30 s on 2 idle cores. The full probe (the launchers with bad data
files, the server with bad bodies) is `python scripts/probe.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import probe  # noqa: E402  (scripts/ is no package)

TIMEOUT_S = 600  # --quick takes about 30 s alone; this bounds a machine shared with other test runs
MIN_CASES = {"loaders": 600, "flags": 20}  # what --quick tries at least (784 and 26 when written)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        p = subprocess.run([sys.executable, "scripts/probe.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scripts/probe.py --quick did not finish within {TIMEOUT_S} s; its output so far:\n"
                    f"{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    assert out.exists(), f"no JSON written (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return {"doc": json.loads(out.read_text(encoding="utf-8")), "rc": p.returncode, "stdout": p.stdout}


def test_quick_probe_tries_enough_cases_and_classifies_each_once(quick):
    summary = quick["doc"]["summary"]
    for part, least in MIN_CASES.items():
        assert summary[part]["cases"] >= least, summary
    for part, s in summary.items():
        assert sum(s[o] for o in probe.OUTCOMES) == s["cases"], (part, s)
    assert summary["loaders"]["ok"] > 100 and summary["loaders"]["clear"] > 100, summary  # valid and bad files both


def test_quick_probe_finds_no_traceback_hang_or_lost_data(quick):
    doc = quick["doc"]
    failing = "\n".join(f"[{f['outcome']}] {f['part']}: {f['name']}: {f['detail'][:400]}\n    {f['repro']}"
                        for f in doc["failures"])
    totals = {k: doc["summary"]["total"][k] for k in ("traceback", "hang", "lost")}
    assert totals == {"traceback": 0, "hang": 0, "lost": 0}, f"{totals}:\n{failing}"
    assert quick["rc"] == 0, quick["stdout"][-3000:]


# ---- the probe's own judgement, on replies of the shape its loader worker sends

def test_the_probe_counts_a_changed_row_or_a_missing_skip_as_lost():
    case = probe.DataCase("t", "ppo", ".jsonl", b"", "bad", [{"prompt": "a"}, None, {"prompt": "c"}], "line 2")
    path = "/tmp/t.jsonl"
    changed = {"kind": "loaded", "rows": [{"prompt": "a"}, {"prompt": "c "}], "skipped": ["x"]}
    assert probe.judge_load(case, True, path, changed)[0] == "lost"
    uncounted = {"kind": "loaded", "rows": [{"prompt": "a"}, {"prompt": "c"}], "skipped": []}
    assert probe.judge_load(case, True, path, uncounted)[0] == "lost"  # 2 loaded + 0 skipped != 3 written
    exact = {"kind": "loaded", "rows": [{"prompt": "a"}, {"prompt": "c"}], "skipped": ["x"]}
    assert probe.judge_load(case, True, path, exact)[0] == "ok"
    assert probe.judge_load(case, False, path, exact)[0] == "lost"  # bad rows taken without skip_bad_rows


def test_the_probe_wants_one_line_naming_the_file_and_the_line():
    case = probe.DataCase("t", "ppo", ".jsonl", b"", "bad", [{"prompt": "a"}, None], "line 2")
    path = "/tmp/t.jsonl"

    def error(message, coati=True):
        return {"kind": "error", "coati": coati, "type": "DataError", "message": message, "traceback": ""}

    assert probe.judge_load(case, False, path, error(f"{path}, line 2, row 1: invalid JSON"))[0] == "clear"
    assert probe.judge_load(case, False, path, error(f"{path}, line 3, row 1: invalid JSON"))[0] == "traceback"
    assert probe.judge_load(case, False, path, error("line 2: invalid JSON"))[0] == "traceback"  # no file
    assert probe.judge_load(case, False, path, error(f"{path}, line 2:\ninvalid"))[0] == "traceback"
    assert probe.judge_load(case, False, path, error(f"{path}, line 2", coati=False))[0] == "traceback"
    assert probe.judge_load(case, False, path, {"kind": "hang"})[0] == "hang"


def test_the_probe_wants_openai_error_bodies():
    body = json.dumps({"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}})
    ok_headers = {"content-type": "application/json"}
    assert probe.judge_http(400, ok_headers, body.encode())[0] == "clear"
    assert probe.judge_http(500, ok_headers, body.encode())[0] == "traceback"
    assert probe.judge_http(400, {"content-type": "text/plain"}, b"Invalid HTTP request received.")[0] == "traceback"
    assert probe.judge_http(422, ok_headers, b'{"detail": [{"loc": ["body"]}]}')[0] == "traceback"  # FastAPI's own
    assert probe.judge_http(200, ok_headers, b'{"choices": []}')[0] == "lost"
