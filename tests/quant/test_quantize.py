"""GPTQ quantization (coati_ray.serve.quantize, scripts/quantize.py) of the micro llama on CPU.

Run in an environment with the `quant` extra (gptqmodel + optimum), e.g. `.venv-quant`
(`VENV=.venv-quant bash scripts/setup.sh quant,test`); skipped where gptqmodel is not installed.
About 20 s on 2 cores: each checkpoint is quantized once per module, from 16 calibration samples.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")

import torch

from coati_ray.errors import ConfigError, DataError
from coati_ray.serve.quantize import choose_group_size, load_quantized, quantize, weight_bytes

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 16
# Measured on the (random) micro preset, 8 demo eval chats, 259 positions: top-1 agreement with
# fp32 is 0.88 at 4 bits and 0.97 at 8 bits (bf16 itself: 0.98); mean KL 7e-5 and 5e-7.
MIN_TOP1 = {4: 0.70, 8: 0.90}
MAX_KL = {4: 1e-2, 8: 1e-3}
# Bytes of the decoder layers (the quantized linears + norms), GPTQ / bf16: 0.30 and 0.55 on micro.
MAX_LAYER_RATIO = {4: 0.35, 8: 0.60}


@pytest.fixture(scope="module")
def checkpoints(micro_model, tmp_path_factory):
    """{bits: (out dir, facts)} for 4 and 8 bits, quantized from the micro preset."""
    root = tmp_path_factory.mktemp("gptq")
    return {bits: (str(root / f"micro-gptq{bits}"),
                   quantize(micro_model, str(root / f"micro-gptq{bits}"), bits=bits, n_samples=N_SAMPLES))
            for bits in (4, 8)}


@pytest.fixture(scope="module")
def eval_chats(micro_model):
    from coati_ray.data.formatting import instruction_prompt, render_chat
    from coati_ray.defaults import demo_file
    from coati_ray.models.loading import load_tokenizer

    tok = load_tokenizer(micro_model)
    rows = [json.loads(line) for line in Path(demo_file("sft_eval.jsonl")).read_text().splitlines()[:8]]
    return [tok(render_chat(tok, instruction_prompt(r["instruction"], r["input"]), r["output"])[1],
                add_special_tokens=False, return_tensors="pt").input_ids for r in rows]


def _layers(model):
    return model.model.layers  # the decoder blocks: what GPTQ quantizes (embeddings, lm_head stay)


@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_is_standard_gptq(checkpoints, micro_model, bits):
    out, facts = checkpoints[bits]
    qc = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits
    # micro's ffn (176) is not a multiple of 128, 64 or 32: quantized per output channel
    assert qc["group_size"] == facts["group_size"] == -1 and facts["requested_group_size"] == 128
    assert facts["bits"] == bits and facts["n_samples"] == N_SAMPLES and facts["seconds"] > 0
    assert list(Path(out).glob("*.safetensors")) and (Path(out) / "tokenizer.json").exists()
    assert 0 < facts["weight_file_bytes"] < facts["source_weight_file_bytes"]
    assert not (Path.cwd() / "logs").exists() or not list((Path.cwd() / "logs").glob("gptq_log_*"))


@pytest.mark.parametrize("bits", [4, 8])
def test_reload_generate_and_match_fp32(checkpoints, micro_model, eval_chats, bits):
    from coati_ray.models.loading import load_causal_lm

    model, tok = load_quantized(checkpoints[bits][0])
    ref = load_causal_lm(micro_model, dtype="fp32").eval()
    prompt = eval_chats[0][:, :20]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 24) and torch.equal(out[:, :20], prompt)
    agree = total = 0
    kls = []
    with torch.no_grad():
        for ids in eval_chats:
            lq = model(ids).logits.float().log_softmax(-1)[0]  # (T, V)
            lr = ref(ids).logits.float().log_softmax(-1)[0]  # (T, V)
            assert torch.isfinite(lq).all()
            agree += (lq.argmax(-1) == lr.argmax(-1)).sum().item()
            total += ids.shape[1]
            kls.append((lr.exp() * (lr - lq)).sum(-1).mean().item())
    top1, kl = agree / total, sum(kls) / len(kls)
    assert top1 >= MIN_TOP1[bits], f"{bits}-bit top-1 agreement with fp32 {top1:.3f} over {total} positions"
    assert kl <= MAX_KL[bits], f"{bits}-bit mean KL(fp32 || quantized) {kl:.2e}"


def test_weight_bytes_fp32_bf16_8bit_4bit(checkpoints, micro_model):
    from coati_ray.models.loading import load_causal_lm

    fp32, bf16 = load_causal_lm(micro_model, dtype="fp32"), load_causal_lm(micro_model, dtype="bf16")
    assert weight_bytes(fp32) > 1.9 * weight_bytes(bf16)  # not exactly 2x: rotary buffers stay fp32
    q4, q8 = (load_quantized(checkpoints[b][0])[0] for b in (4, 8))
    base = weight_bytes(_layers(bf16))
    for bits, q in ((4, q4), (8, q8)):
        ratio = weight_bytes(_layers(q)) / base
        assert ratio < MAX_LAYER_RATIO[bits], f"{bits}-bit layers are {ratio:.3f} x bf16"
    assert weight_bytes(q4) < weight_bytes(q8) < weight_bytes(bf16) < weight_bytes(fp32)


def test_missing_calibration_file_names_it(micro_model, tmp_path):
    missing = tmp_path / "no_such_calibration.jsonl"
    with pytest.raises(DataError, match="no_such_calibration.jsonl") as e:
        quantize(micro_model, str(tmp_path / "out"), calibration_file=str(missing))
    assert "not found" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_user_calibration_file_and_cli(micro_model, tmp_path, capsys, caplog):
    """scripts/quantize.py on a user's text file: one summary line; a bad flag exits 2 with one message."""
    spec = importlib.util.spec_from_file_location("quantize_cli", ROOT / "scripts" / "quantize.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": f"Tom has {i} apples and gets {i + 2} more. The answer is "
                                                f"{2 * i + 2}."}) + "\n" for i in range(12)))
    facts = cli.main([micro_model, str(tmp_path / "q8"), "--bits", "8", "--calibration_file", str(data),
                      "--n_samples", "8"])
    assert facts["n_samples"] == 8 and facts["calibration_file"] == str(data)
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "8-bit GPTQ" in summary[0] and str(tmp_path / "q8") in summary[0]

    from coati_ray.cli import run_main

    with caplog.at_level(logging.ERROR, logger="coati_ray"), pytest.raises(SystemExit) as e:
        run_main(lambda: cli.main([micro_model, str(tmp_path / "q8"), "--calibration_file", str(data)]))
    assert e.value.code == 2 and "not an empty directory" in caplog.text


def test_missing_gptqmodel_names_the_extra(micro_model, tmp_path, monkeypatch):
    from coati_ray.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # import gptqmodel -> ImportError
    with pytest.raises(MissingExtraError, match=r"coati_ray\[quant\]"):
        quantize(micro_model, str(tmp_path / "out"))


def test_bad_arguments_are_config_errors(micro_model, tmp_path):
    with pytest.raises(ConfigError, match="--bits"):
        quantize(micro_model, str(tmp_path / "a"), bits=3)
    with pytest.raises(ConfigError, match="--group_size"):
        quantize(micro_model, str(tmp_path / "b"), group_size=100)


def test_group_size_choice():
    assert choose_group_size(128, [768, 768, 2048]) == 128  # a ~100M llama: kept
    assert choose_group_size(128, [192, 320]) == 64
    assert choose_group_size(128, [256, 688]) == -1  # tiny preset: 688 = 16 * 43
    assert choose_group_size(32, [64, 176]) == -1  # micro preset
    assert choose_group_size(-1, [64, 176]) == -1
