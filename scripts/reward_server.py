#!/usr/bin/env python
"""An example reward server for `--reward_url`: scores with any reward function or built-in verifier.

    python scripts/reward_server.py --reward_fn math --port 8600
    python launchers/ppo_cluster.py prompts.jsonl --reward_url http://127.0.0.1:8600/score ...

POST /score takes {"prompts": [...], "responses": [...], "columns": {...}, "sample_ids": [...]} and
answers {"rewards": [...]}; GET /health answers {"ok": true}. A reward that fails answers 422 with
the reason (the trainer reports it and stops); a malformed body answers 422 too. Put your own judge
(an LLM, a sandbox that runs code tests) behind the same two routes.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati_ray.config import _help  # noqa: E402


@dataclass
class ServerArgs:
    reward_fn: str = _help("The reward: a built-in verifier (math, demo, format:REGEX) or "
                           "'path/to/rewards.py:name'.", default="demo")
    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("Port to listen on.", default=8600)


def make_app(reward_fn: str):
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    from coati_ray.rewards.functions import RewardBatch, RewardError, call_reward_function, load_function
    from coati_ray.rewards.verifiers import builtin

    # (no `from __future__ import annotations` in this file: FastAPI reads `Body` below at definition time)
    found = builtin(reward_fn)
    fn, label = (found[1], reward_fn) if found else (load_function(reward_fn), f"function {reward_fn}")

    class Body(BaseModel):
        prompts: list[str]
        responses: list[str]
        columns: dict[str, list] = {}
        sample_ids: list[int] = []

    app = FastAPI(title="coati_ray example reward server")

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/score")
    def score(body: Body) -> dict:  # a plain def: FastAPI runs it in a worker thread, off the event loop
        n = len(body.prompts)
        if len(body.responses) != n or any(len(v) != n for v in body.columns.values()):
            raise HTTPException(422, f"prompts, responses and every column need the same length ({n})")
        batch = RewardBatch(body.prompts, body.responses, body.columns, body.sample_ids or list(range(n)))
        try:
            return {"rewards": call_reward_function(fn, label, batch)}
        except RewardError as e:
            raise HTTPException(422, str(e)) from None

    return app


def main(argv=None) -> None:
    from coati_ray.cli import parse, run_main, setup_logging

    setup_logging()
    (args,), _ = parse([ServerArgs], argv, __doc__)

    def serve() -> None:
        import uvicorn

        uvicorn.run(make_app(args.reward_fn), host=args.host, port=args.port, log_level="warning")

    run_main(serve)


if __name__ == "__main__":
    main()
