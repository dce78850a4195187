#!/usr/bin/env bash
# The GPU checks, for one machine with one CUDA GPU, torch and no internet (under 8 minutes).
#
#   bash scripts/gpu_check.sh                 # uses `python3` (or $PYTHON) as it is
#   WHEELS=.whl bash scripts/gpu_check.sh     # first installs what is missing from local wheels
#   bash scripts/gpu_check.sh tests/vllm_engine   # only these tests (e.g. those a first run did not reach)
#
# Runs every GPU-marked test (NCCL group, ddp and fsdp on CUDA, bf16, a GPU trainer actor,
# colossalai ZeRO-2 / Gemini when colossalai imports, vLLM when vllm imports) plus the vLLM
# backend suite when vllm imports, then prints one table: each test, and whether it passed,
# failed, was skipped (with why) or was not run (the time budget ran out). Exit status non-zero if
# any test failed or was not run, or CUDA is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/coati_ray_gpu_check}"
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e . pytest pytest-timeout || exit 1
fi
# GPU_CHECK_ON_CPU=1 runs the same script on a CPU machine (every GPU test skips): a dry run.
if [ -z "${GPU_CHECK_ON_CPU:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch does not see a CUDA GPU here; nothing to check" >&2; exit 1
fi
"$PY" - <<'PY'
import importlib.util, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")
for m in ("vllm", "colossalai", "ray", "transformers"):
    spec = importlib.util.find_spec(m)
    v = __import__(m).__version__ if spec else "not installed"
    print(f"  {m}: {v}")
PY
suites=("$@")  # default: every suite this environment can run
if [ ${#suites[@]} -eq 0 ]; then
  suites=(tests/gpu)
  "$PY" -c "import colossalai" 2>/dev/null && suites+=(tests/colossalai_booster)
  "$PY" -c "import vllm" 2>/dev/null && suites+=(tests/vllm_engine)
fi
# The 8-minute budget holds by construction: no test starts after BUDGET_S seconds (pytest-timeout's
# session limit, checked between tests) and none runs past TEST_TIMEOUT_S; the table lists the
# tests the budget left out as "not run".
BUDGET_S="${BUDGET_S:-300}"; TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-150}"
"$PY" -m pytest -p no:cacheprovider -q --collect-only "${suites[@]}" 2>/dev/null | grep '::' >"$OUT/collected.txt"
"$PY" -m pytest -p no:cacheprovider -q -rA --timeout "$TEST_TIMEOUT_S" --session-timeout "$BUDGET_S" \
  --junitxml "$OUT/junit.xml" "${suites[@]}" >"$OUT/pytest.log" 2>&1
rc=$?
tail -n 25 "$OUT/pytest.log"
"$PY" - "$OUT/junit.xml" "$OUT/collected.txt" <<'PY'
import sys, xml.etree.ElementTree as ET


def junit_key(node_id):  # tests/gpu/test_x.py::Cls::test[p] -> tests.gpu.test_x.Cls::test[p]
    path, *parts = node_id.split("::")
    return ".".join([path.removesuffix(".py").replace("/", ".")] + parts[:-1]) + "::" + parts[-1]


rows, seen = [], set()
for case in ET.parse(sys.argv[1]).iter("testcase"):
    seen.add(f"{case.get('classname')}::{case.get('name')}")
    status, why = "passed", ""
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
            why = (el.get("message") or "").splitlines()[0][:70] if el.get("message") else ""
    rows.append((f"{case.get('classname')}::{case.get('name')}", status, f"{float(case.get('time', 0)):.1f}s", why))
for node_id in open(sys.argv[2]).read().split():
    if junit_key(node_id) not in seen:
        rows.append((junit_key(node_id), "not run", "", "the session budget ran out first"))
w = max(len(r[0]) for r in rows) if rows else 10
print(f"\n{'test':<{w}}  {'result':<8} {'time':>7}  why")
for r in rows:
    print(f"{r[0]:<{w}}  {r[1]:<8} {r[2]:>7}  {r[3]}")
n = {s: sum(r[1] == s for r in rows) for s in ("passed", "FAILED", "ERROR", "skipped", "not run")}
print(f"\n{n['passed']} passed, {n['FAILED']} failed, {n['ERROR']} errors, {n['skipped']} skipped, "
      f"{n['not run']} not run")
sys.exit(1 if n["not run"] else 0)
PY
table_rc=$?
[ "$rc" -ne 0 ] && exit "$rc"
exit "$table_rc"
