"""Generator actor: rollouts on its own shard of the prompts, scored into experience chunks.

One `rollout(chunk, min_version, ticket, kl_coef)` call, made by the replay buffer when it has
room (so the buffer owns the returned chunk):
    0. bring the weights up to date through the weight-sync ticket if this generator holds a
       version below `min_version` (see coati_ray/sync/)
    1. take this step's prompts from the shard (a function of seed, episode and step only)
    2. sample `n_samples_per_prompt` responses each with the backend (log-probs included)
    3. reference log-probs and reward scores from a reference and a reward actor, which read the
       rollout straight from the object store
    4. per-token KL; critic-free estimators (grpo, rloo) also get their advantages here
    5. return (chunk, metadata) as two objects: the buffer keeps the first as a reference and
       reads only the second
The driver never sees the chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from coati_ray.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_CRITIC,
    normalize_scores,
)
from coati_ray.algos.kl import token_kl
from coati_ray.algos.objectives import overlong_penalty
from coati_ray.engines.backends import make_backend
from coati_ray.engines.generation import SamplingParams, WeightUpdate
from coati_ray.experience import Experience
from coati_ray.rewards.functions import RewardBatch
from coati_ray.rewards.sources import weighted_total
from coati_ray.sync.base import WeightTicket
from coati_ray.workers.chunks import Chunk, ChunkMeta
from coati_ray.workers.job import RolloutJob

logger = logging.getLogger(__name__)


class GeneratorWorker:
    def __init__(self, index: int, job: RolloutJob, references: list, rewards: list, num_threads: int = 1):
        from coati_ray.data.formatting import render_prompt
        from coati_ray.data.loading import load_rows, prompt_columns
        from coati_ray.models.loading import load_tokenizer
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.index, self.job = index, job
        self.reference = references[index % len(references)]
        self.reward = rewards[index % len(rewards)]
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(job.policy_path)
        loaded = load_rows(job.prompt_file, prompt_columns(job.data.keys()), job.data.skip_bad_rows)
        self.prompts = loaded.dataset["prompt"]  # tokenized on first use: any generator can be sent any row
        self.columns = loaded.extra  # each row's other columns: what reward functions read (e.g. `answer`)
        self.reward_specs = job.reward_specs
        self.render_prompt = render_prompt
        ro = job.rollout
        self.max_prompt = max(8, job.data.max_len - ro.max_new_tokens)
        self.prompt_ids: dict[int, list[int]] = {}
        self.backend = make_backend(ro.generator_backend, job.policy_path, job.model.model, job.model.dtype,
                                    job.lora, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.device,
                                    job.seed, max_model_len=job.data.max_len,
                                    vllm_options={"tensor_parallel_size": ro.vllm_tensor_parallel_size,
                                                  "gpu_memory_utilization": ro.vllm_gpu_memory_utilization,
                                                  "enforce_eager": ro.vllm_enforce_eager,
                                                  "engine_options": job.engine_options})
        self.version = 0
        self.rollouts = 0

    # --- weights ----------------------------------------------------------------------------------
    def load_weights(self, update: WeightUpdate) -> float:
        """Load `update` if it is newer than what this generator holds; returns the seconds it took."""
        t0 = time.perf_counter()
        if update.version <= self.version:
            return 0.0
        self.backend.load_weights(update)
        self.version = update.version
        return time.perf_counter() - t0

    def run(self, fn, *args):
        """`fn(self, *args)` in this actor: a weight-sync transport's generator side (coati_ray/sync/)."""
        return fn(self, *args)

    def node_id(self) -> str:
        from coati_ray.runtime import current_node_id

        return current_node_id()

    def weight_version(self) -> int:
        return self.version

    def log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
        return self.backend.log_probs(sequences, attention_mask, num_actions, self.job.rollout.temperature)

    def sync_check(self, ticket: WeightTicket, exp: Experience, rows: int = 2) -> tuple[int, torch.Tensor]:
        """(version, log-probs of the first `rows` of `exp`, 0 past each response's end) once up to
        date with `ticket`. Only response tokens count: what an engine returns for the padding
        after a short response is not defined."""
        ticket.bring_up_to_date(self)
        e = exp.select(list(range(min(rows, exp.size))))
        return self.version, self.log_probs(e.sequences, e.attention_mask, e.num_actions) * e.action_mask

    # --- rollouts -----------------------------------------------------------------------------------
    def tokens_of(self, row: int) -> list[int]:
        ids = self.prompt_ids.get(row)
        if ids is None:
            text = self.render_prompt(self.tokenizer, self.prompts[row])
            ids = self.prompt_ids[row] = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt:]
        return ids

    def rollout(self, chunk: Chunk, min_version: int, ticket: WeightTicket, kl_coef: float):
        """Make the experience of `chunk`: returns (Experience, ChunkMeta)."""
        import ray

        t_load = 0.0
        if self.version < min_version:  # 0. never generate with weights older than asked for
            t_load = ticket.bring_up_to_date(self)
            if self.version < min_version:
                raise RuntimeError(f"generator-{self.index}: step {chunk.step} needs weights v{min_version}, "
                                   f"got v{self.version}")
        ro, obj, n = self.job.rollout, self.job.objective, chunk.n_samples
        # 1-2. sample; seeded by (seed, step, chunk) so a resumed run, or a chunk issued again, samples alike
        t0 = time.perf_counter()
        params = SamplingParams(ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens,
                                seed=self.job.seed * 1_000_003 + chunk.step * 1009 + chunk.index)
        ids = [self.tokens_of(i) for i in chunk.rows for _ in range(n)]
        out = self.backend.generate(ids, params)
        sample_ids = chunk.sample_ids()
        exp = self._to_experience(ids, out, sample_ids, [i for i in chunk.rows for _ in range(n)])
        t1 = time.perf_counter()
        # 3. reference and reward read the rollout from the object store (not via the driver)
        rollout_ref = ray.put(exp)
        batch = self._reward_batch(exp, out, sample_ids, [i for i in chunk.rows for _ in range(n)])
        ref_lp, scores = ray.get([self.reference.log_probs.remote(rollout_ref, ro.temperature),
                                  self.reward.score.remote(rollout_ref, batch)])
        score = weighted_total(scores, self.reward_specs)  # (B,)
        if obj.overlong_buffer:  # DAPO eq. 13: the length shaping is part of the score
            scores["overlong"] = overlong_penalty(exp.action_mask.sum(1), ro.max_new_tokens, obj.overlong_buffer,
                                                  obj.overlong_penalty)
            score = score + scores["overlong"]
        # 4. KL and (critic-free) advantages
        kl = token_kl(exp.log_probs, ref_lp, exp.action_mask, obj.kl_estimator)
        shaped = normalize_scores(score, obj.reward_clip, obj.normalize_reward)
        exp = replace(exp, ref_log_probs=ref_lp, kl=kl, score=shaped, raw_score=score)
        if not NEEDS_CRITIC[obj.advantage_estimator]:
            adv, ret = ADVANTAGE_ESTIMATORS[obj.advantage_estimator](
                shaped, kl, exp.action_mask, kl_coef, None, n, obj.gamma, obj.lam)
            exp = replace(exp, advantages=adv, returns=ret)
        t2 = time.perf_counter()
        self.rollouts += 1
        lengths = exp.action_mask.sum(1)
        k1 = (exp.log_probs - ref_lp) * exp.action_mask
        stats = {"score_sum": float(score.sum()), "score_sq": float(score.square().sum()),
                 "kl_sum": float(k1.sum()), "length_sum": float(lengths.sum()),
                 "finished": float(sum(g.finished for g in out)), "tokens": float(lengths.sum()),
                 "generate_s": t1 - t0, "score_s": t2 - t1, "load_s": t_load,
                 **{f"source_sum/{k}": float(v.sum()) for k, v in scores.items()},
                 **{f"source_sq/{k}": float(v.float().square().sum()) for k, v in scores.items()}}
        return exp, ChunkMeta(chunk.step, self.version, sample_ids, self.index, stats)

    def _reward_batch(self, exp: Experience, out, sample_ids: list[int], rows: list[int]) -> RewardBatch:
        """The text side of a rollout for reward functions and servers: prompts as the dataset has
        them, decoded responses, and the rows' other columns (a key missing in some rows is None)."""
        keys = sorted({k for r in set(rows) for k in self.columns[r]})
        return RewardBatch([self.prompts[r] for r in rows],
                           [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in out],
                           {k: [self.columns[r].get(k) for r in rows] for k in keys}, list(sample_ids))

    def rollouts_done(self) -> int:
        return self.rollouts

    def _to_experience(self, prompts: list[list[int]], out, sample_ids: list[int],
                       prompt_index: list[int]) -> Experience:
        pad = self.tokenizer.pad_token_id
        P = max(len(p) for p in prompts)
        A = max(1, max(len(g.token_ids) for g in out))
        B = len(prompts)
        seq = torch.full((B, P + A), pad, dtype=torch.long)
        mask = torch.zeros((B, P + A), dtype=torch.long)
        action_mask = torch.zeros((B, A))
        log_probs = torch.zeros((B, A))
        for i, (p, g) in enumerate(zip(prompts, out)):
            seq[i, P - len(p):P] = torch.tensor(p)
            mask[i, P - len(p):P] = 1
            r = g.token_ids or [self.tokenizer.eos_token_id]  # an empty response still ends somewhere
            seq[i, P:P + len(r)] = torch.tensor(r)
            mask[i, P:P + len(r)] = 1
            action_mask[i, :len(r)] = 1
            log_probs[i, :len(g.log_probs)] = torch.tensor(g.log_probs)
        n = len(prompts)
        return Experience(seq, mask, action_mask, log_probs, torch.zeros(n), torch.tensor(sample_ids),
                          torch.full((n,), self.version), torch.tensor(prompt_index))
