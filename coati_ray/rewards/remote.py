"""A reward server as a reward source (`--reward_url`).

Protocol: POST a JSON body `{"prompts": [...], "responses": [...], "columns": {...}, "sample_ids": [...]}`;
the answer is `{"rewards": [...]}` (or a bare list), one number per sample. `scripts/reward_server.py`
is an example server.

A batch is cut into `max_inflight` parts sent at once (so a reward actor never has more requests
open than that). A part that times out, cannot connect, or gets a 429 / 5xx is sent again after
0.5 s, 1 s, 2 s, ... (`retries` times, a warning each); any other 4xx, or an answer that is not the
expected JSON, is an error at once.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from coati_ray.rewards.functions import RewardBatch, RewardError, check_rewards

logger = logging.getLogger(__name__)

TRANSIENT = {429, 500, 502, 503, 504}


class RemoteReward:
    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, max_inflight: int = 4,
                 backoff_s: float = 0.5):
        import requests

        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.max_inflight = max(1, max_inflight)
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(self.max_inflight, thread_name_prefix="reward-http")
        self.retried = 0  # requests sent again after a transient failure (for metrics and tests)

    def __call__(self, batch: RewardBatch) -> list[float]:
        n = len(batch)
        size = -(-n // self.max_inflight)
        parts = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        futures = [self.pool.submit(self._post, _subset(batch, idx)) for idx in parts]
        out: list[float] = []
        for f in futures:
            out.extend(f.result())
        return out

    def _post(self, batch: RewardBatch) -> list[float]:
        import requests

        body = {"prompts": batch.prompts, "responses": batch.responses, "columns": batch.columns,
                "sample_ids": batch.sample_ids}
        first = batch.sample_ids[0] if batch.sample_ids else "-"
        for attempt in range(self.retries + 1):
            why = None
            try:
                r = self.session.post(self.url, json=body, timeout=self.timeout_s)
            except requests.Timeout:
                why = f"no answer within {self.timeout_s:g} s"
            except requests.ConnectionError as e:
                why = f"cannot connect ({type(e).__name__})"
            else:
                if r.status_code in TRANSIENT:
                    why = f"HTTP {r.status_code}"
                elif r.status_code >= 400:
                    raise RewardError(f"reward server {self.url} answered HTTP {r.status_code} for samples from "
                                      f"{first}: {r.text.strip()[:200]}")
                else:
                    return self._read(r, batch)
            if attempt == self.retries:
                raise RewardError(f"reward server {self.url}: {why} for samples from {first}, after "
                                  f"{self.retries + 1} tries")
            delay = self.backoff_s * 2 ** attempt
            self.retried += 1
            logger.warning("reward server %s: %s; trying again in %.1f s (%d of %d)", self.url, why, delay,
                           attempt + 1, self.retries)
            time.sleep(delay)  # back-off between tries of a failed request
        raise AssertionError("unreachable")

    def _read(self, r, batch: RewardBatch) -> list[float]:
        try:
            data = r.json()
        except ValueError:
            raise RewardError(f"reward server {self.url} answered with something that is not JSON: "
                              f"{r.text.strip()[:120]!r}") from None
        rewards = data.get("rewards") if isinstance(data, dict) else data
        if rewards is None:
            raise RewardError(f"reward server {self.url} answered JSON without 'rewards': {str(data)[:120]}")
        return check_rewards(rewards, f"server {self.url}", batch.sample_ids)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()


def _subset(batch: RewardBatch, idx: list[int]) -> RewardBatch:
    return RewardBatch([batch.prompts[i] for i in idx], [batch.responses[i] for i in idx],
                       {k: [v[i] for i in idx] for k, v in batch.columns.items()}, [batch.sample_ids[i] for i in idx])
