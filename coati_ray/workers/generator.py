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
import random
import time
from dataclasses import dataclass, replace

import torch

from coati_ray.algos import NEEDS_CRITIC
from coati_ray.algos.advantages import ADVANTAGE_ESTIMATORS, normalize_scores
from coati_ray.algos.kl import token_kl
from coati_ray.algos.objectives import groups_with_signal, overlong_penalty
from coati_ray.engines.backends import make_backend
from coati_ray.engines.generation import SamplingParams, WeightUpdate
from coati_ray.experience import Experience
from coati_ray.rewards.functions import RewardBatch
from coati_ray.rewards.sources import weighted_total
from coati_ray.sync.base import WeightTicket
from coati_ray.workers.chunks import Chunk, ChunkMeta
from coati_ray.workers.job import RolloutJob

logger = logging.getLogger(__name__)


def _actor(name_or_handle):
    """An actor by name. A restartable actor's constructor takes other actors' names, not handles: a
    handle in the arguments is a reference Ray must keep for a restart (it says so, as an error line,
    at every start: ray-project/ray#53727), while a name is looked up again by the restarted one."""
    if not isinstance(name_or_handle, str):
        return name_or_handle
    import ray

    return ray.get_actor(name_or_handle)


class GeneratorWorker:
    def __init__(self, index: int, job: RolloutJob, references: list, rewards: list, num_threads: int = 1,
                 scorers: tuple | None = None, share_policy: bool = False):
        """`references` / `rewards`: the names (or handles) of the actors to score with; or, with `scorers` =
        (ReferenceWorker
        arguments, RewardWorker arguments) and no handles, both built here and called in this process
        (--colocate rollout). `share_policy`: no engine of its own; the trainer rank that holds this
        generator sets `backend` to one over its module (--colocate all, workers/hybrid.py)."""
        from coati_ray.data.formatting import render_prompt
        from coati_ray.data.loading import load_rows, prompt_columns
        from coati_ray.models.loading import load_tokenizer
        from coati_ray.runtime import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.index, self.job = index, job
        self.local_scoring = not references
        if self.local_scoring:  # --colocate rollout: the same classes, in this process
            from coati_ray.workers.reference import ReferenceWorker
            from coati_ray.workers.reward import RewardWorker

            self.reference, self.reward = ReferenceWorker(*scorers[0]), RewardWorker(*scorers[1])
        else:
            self.reference = _actor(references[index % len(references)])
            self.reward = _actor(rewards[index % len(rewards)])
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(job.policy_path)
        loaded = load_rows(job.prompt_file, prompt_columns(job.data.keys()), job.data.skip_bad_rows,
                           **job.data.hub_options("prompt_dataset"))
        self.prompts = loaded.dataset["prompt"]  # tokenized on first use: any generator can be sent any row
        self.columns = loaded.extra  # each row's other columns: what reward functions read (e.g. `answer`)
        self.reward_specs = job.reward_specs
        self.render_prompt = render_prompt
        ro = job.rollout
        self.max_prompt = max(8, job.data.max_len - ro.max_new_tokens)
        self.prompt_ids: dict[int, list[int]] = {}
        vllm = {"tensor_parallel_size": ro.vllm_tensor_parallel_size, "enforce_eager": ro.vllm_enforce_eager,
                "gpu_memory_utilization": ro.vllm_gpu_memory_utilization, "engine_options": job.engine_options}
        self.backend = None if share_policy else make_backend(
            ro.generator_backend, job.policy_path, job.model.model, job.model.dtype, job.lora,
            self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.device, job.seed,
            max_model_len=job.data.max_len, vllm_options=vllm)
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

    def sync_gap(self, ticket: WeightTicket, exp: Experience, trainer_log_probs: torch.Tensor) -> tuple[int, float]:
        """(version, the largest |log-prob| difference from the trainer's `trainer_log_probs` of the same
        rows) once up to date with `ticket`: the driver's sync check, computed here (no tensor reaches it)."""
        version, lp = self.sync_check(ticket, exp, rows=trainer_log_probs.shape[0])
        return version, float((lp - trainer_log_probs).abs().max())

    # --- rollouts -----------------------------------------------------------------------------------
    def tokens_of(self, row: int) -> list[int]:
        ids = self.prompt_ids.get(row)
        if ids is None:
            text = self.render_prompt(self.tokenizer, self.prompts[row])
            ids = self.prompt_ids[row] = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt:]
        return ids

    def rollout(self, chunk: Chunk, min_version: int, ticket: WeightTicket, kl_coef: float):
        """Make the experience of `chunk`: returns (Experience, ChunkMeta)."""
        t_load = 0.0
        if self.version < min_version:  # 0. never generate with weights older than asked for
            t_load = ticket.bring_up_to_date(self)
            if self.version < min_version:
                raise RuntimeError(f"generator-{self.index}: step {chunk.step} needs weights v{min_version}, "
                                   f"got v{self.version}")
        obj, n = self.job.objective, chunk.n_samples
        t0 = time.perf_counter()
        # 1-3. sample and score (reference log-probs, every reward source)
        part = self._sample_and_score(list(chunk.rows), chunk, chunk.sample_ids(), attempt=0)
        dyn: dict[str, float] = {}
        if obj.dynamic_sampling:
            part, dyn = self._dynamic_sampling(chunk, part)
        exp, out, scores, rows = part.exp, part.out, part.scores, part.rows
        exp = replace(exp, sample_ids=torch.tensor(chunk.sample_ids()),
                      prompt_index=torch.tensor([r for r in rows for _ in range(n)]))
        score, t1 = part.total, time.perf_counter()
        # 4. KL and (critic-free) advantages
        kl = token_kl(exp.log_probs, exp.ref_log_probs, exp.action_mask, obj.kl_estimator)
        shaped = normalize_scores(score, obj.reward_clip, obj.normalize_reward)
        exp = replace(exp, kl=kl, score=shaped, raw_score=score)
        if not NEEDS_CRITIC[obj.advantage_estimator]:
            adv, ret = ADVANTAGE_ESTIMATORS[obj.advantage_estimator](
                shaped, kl, exp.action_mask, kl_coef, None, n, obj.gamma, obj.lam)
            exp = replace(exp, advantages=adv, returns=ret)
        t2 = time.perf_counter()
        self.rollouts += 1
        lengths = exp.action_mask.sum(1)
        k1 = (exp.log_probs - exp.ref_log_probs) * exp.action_mask
        stats = {"score_sum": float(score.sum()), "score_sq": float(score.square().sum()),
                 "kl_sum": float(k1.sum()), "length_sum": float(lengths.sum()),
                 "finished": float(sum(g.finished for g in out)), "tokens": float(lengths.sum()),
                 "generate_s": t1 - t0 - part.score_s, "score_s": part.score_s + t2 - t1, "load_s": t_load, **dyn,
                 **{f"source_sum/{k}": float(v.sum()) for k, v in scores.items()},
                 **{f"source_sq/{k}": float(v.float().square().sum()) for k, v in scores.items()}}
        sample = {"prompt": self.tokenizer.decode(self.tokens_of(rows[0]), skip_special_tokens=True),
                  "response": self.tokenizer.decode(out[0].token_ids, skip_special_tokens=True),
                  "reward": float(score[0])}
        return exp, ChunkMeta(chunk.step, self.version, chunk.sample_ids(), self.index, stats, [sample])

    def _sample_and_score(self, rows: list[int], chunk: Chunk, sample_ids: list[int], attempt: int) -> _Part:
        """Sample `n_samples` responses for each prompt row and score them: the reference's log-probs and
        every reward source. Seeded by (seed, step, chunk, attempt): a resumed run, or a chunk issued
        again, samples alike."""
        import ray

        ro, obj, n = self.job.rollout, self.job.objective, chunk.n_samples
        params = SamplingParams(ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens,
                                seed=self.job.seed * 1_000_003 + chunk.step * 1009 + chunk.index + attempt * 7919,
                                ignore_eos=ro.ignore_eos)
        each = [r for r in rows for _ in range(n)]
        ids = [self.tokens_of(i) for i in each]
        out = self.backend.generate(ids, params)
        exp = self._to_experience(ids, out, sample_ids, each)
        t = time.perf_counter()
        batch = self._reward_batch(exp, out, sample_ids, each)
        if self.local_scoring:
            ref_lp, scores = self.reference.log_probs(exp, ro.temperature), self.reward.score(exp, batch)
        else:  # the reference and the reward actor read the rollout from the object store (not via the driver)
            rollout_ref = ray.put(exp)
            ref_lp, scores = ray.get([self.reference.log_probs.remote(rollout_ref, ro.temperature),
                                      self.reward.score.remote(rollout_ref, batch)])
        total = weighted_total(scores, self.reward_specs)  # (B,)
        if obj.overlong_buffer:  # DAPO eq. 13: the length shaping is part of the score
            scores["overlong"] = overlong_penalty(exp.action_mask.sum(1), ro.max_new_tokens, obj.overlong_buffer,
                                                  obj.overlong_penalty)
            total = total + scores["overlong"]
        return _Part(replace(exp, ref_log_probs=ref_lp), list(out), scores, total, list(rows), n,
                     time.perf_counter() - t)

    def _dynamic_sampling(self, chunk: Chunk, first: _Part) -> tuple[_Part, dict[str, float]]:
        """DAPO's dynamic sampling (arXiv:2503.14476 eq. 11): a group whose samples all got the same score
        teaches nothing to a group-relative estimator; replace it by the group of another prompt (drawn
        with a seed of (seed, step, chunk, try)), up to --dynamic_sampling_tries times. Groups still
        missing then keep their first, signal-free samples (counted as unfilled)."""
        n, tries = chunk.n_samples, self.job.objective.dynamic_sampling_tries
        ids = chunk.sample_ids()
        keep = groups_with_signal(first.total, n)
        good, flat = [first.groups(keep)], [first.groups(~keep)]
        missing, dropped, extra = int((~keep).sum()), int((~keep).sum()), 0
        for attempt in range(1, tries + 1):
            if not missing:
                break
            rng = random.Random(hash((self.job.seed, chunk.step, chunk.index, attempt)))
            rows = rng.sample(range(len(self.prompts)), min(missing, len(self.prompts)))
            part = self._sample_and_score(rows, chunk, ids[-missing * n:][:len(rows) * n], attempt)
            extra += len(rows)
            keep = groups_with_signal(part.total, n)[:missing]
            good.append(part.groups(keep))
            missing -= int(keep.sum())
            dropped += int((~keep).sum())
        if missing:  # tries ran out: the first try's signal-free groups fill the chunk
            good.append(_Part.join(flat, self.tokenizer.pad_token_id).first_groups(missing))
        joined = _Part.join(good, self.tokenizer.pad_token_id)
        return joined, {"dyn_dropped_groups": float(dropped), "dyn_extra_prompts": float(extra),
                        "dyn_unfilled_groups": float(missing)}

    def _reward_batch(self, exp: Experience, out, sample_ids: list[int], rows: list[int]) -> RewardBatch:
        """The text side of a rollout for reward functions and servers: prompts as the dataset has
        them, decoded responses, and the rows' other columns (a key missing in some rows is None)."""
        from coati_ray.data.conversations import last_user_text

        keys = sorted({k for r in set(rows) for k in self.columns[r]})
        columns = {k: [self.columns[r].get(k) for r in rows] for k in keys}
        if any(isinstance(self.prompts[r], list) for r in rows):  # a conversation: its last user turn is graded
            columns["messages"] = [self.prompts[r] for r in rows]
        return RewardBatch([last_user_text(self.prompts[r]) for r in rows],
                           [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in out],
                           columns, list(sample_ids))

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


@dataclass
class _Part:
    """Some prompt groups of a chunk, sampled and scored: the unit dynamic sampling keeps or drops."""

    exp: Experience  # (G * n) rows, with ref_log_probs
    out: list  # the backend's generations, one per row
    scores: dict[str, torch.Tensor]  # source -> (G * n,)
    total: torch.Tensor  # (G * n,) weighted sum (+ overlong shaping)
    rows: list[int]  # G prompt rows
    n: int  # samples per prompt
    score_s: float = 0.0  # seconds spent scoring (reference + rewards)

    def groups(self, keep: torch.Tensor) -> _Part:
        """The groups where `keep` (G,) is True."""
        idx = [g * self.n + j for g in range(len(self.rows)) if keep[g] for j in range(self.n)]
        return _Part(self.exp.select(idx), [self.out[i] for i in idx], {k: v[idx] for k, v in self.scores.items()},
                     self.total[idx], [r for g, r in enumerate(self.rows) if keep[g]], self.n, self.score_s)

    def first_groups(self, k: int) -> _Part:
        keep = torch.zeros(len(self.rows), dtype=torch.bool)
        keep[:k] = True
        return self.groups(keep)

    @staticmethod
    def join(parts: list[_Part], pad_token_id: int) -> _Part:
        parts = [p for p in parts if p.rows] or parts[:1]
        return _Part(Experience.concat([p.exp for p in parts], pad_token_id), [g for p in parts for g in p.out],
                     {k: torch.cat([p.scores[k] for p in parts]) for k in parts[0].scores},
                     torch.cat([p.total for p in parts]), [r for p in parts for r in p.rows], parts[0].n,
                     sum(p.score_s for p in parts))
