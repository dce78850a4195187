#!/usr/bin/env python
"""Export the chat page's feedback (POST /v1/feedback rows) as KTO rows and DPO pairs.

    python scripts/export_feedback.py --db out/ppo/feedback.sqlite --kto out/kto.jsonl --dpo out/dpo.jsonl
    python scripts/export_feedback.py --db postgresql+psycopg://me@db/chat --dpo out/dpo.jsonl --model ppo

KTO: one row per 👍 / 👎, {"prompt": [messages], "completion": "<the answer>", "label": true for 👍}.
DPO: one pair per edit that differs from the answer, {"prompt": [messages], "chosen": "<the edit>",
"rejected": "<the answer>"}. Each row also carries "id", "model" and "weight_version". JSON lines,
UTF-8. A stored row whose messages are unreadable is reported and skipped; the database is only read.
Then: python launchers/train_dpo.py --dataset out/dpo.jsonl (or --loss kto --dataset out/kto.jsonl).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati_ray.cli import run_main, setup_logging
from coati_ray.errors import ConfigError


def parse(argv):
    p = argparse.ArgumentParser(description="Export chat-page feedback as KTO rows and DPO pairs (JSON lines).")
    p.add_argument("--db", required=True,
                   help="The feedback database: a SQLite file (the server's default: feedback.sqlite in the model "
                        "directory) or a SQLAlchemy URL, as given to launchers/serve.py --feedback_db.")
    p.add_argument("--kto", default=None, help="Write KTO rows (one per thumbs up / down) to this file.")
    p.add_argument("--dpo", default=None, help="Write DPO pairs (one per edit that changed the answer) to this file.")
    p.add_argument("--model", default=None, help="Only the rows of this served model name (default: all).")
    args = p.parse_args(argv)
    if not args.kto and not args.dpo:
        p.error("give --kto, --dpo or both")
    return args


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def main(argv=None) -> dict:
    setup_logging()
    args = parse(argv)
    from coati_ray.serve.feedback import export

    if "://" not in args.db and not Path(args.db).is_file():
        raise ConfigError("db", f"{args.db}: no such file (a SQLite path or a SQLAlchemy URL)")
    counts = export(args.db, args.kto, args.dpo, args.model)
    parts = [f"{_n(counts['kto'], 'KTO row', 'KTO rows')} to {args.kto}" if args.kto else None,
             f"{_n(counts['dpo'], 'DPO pair', 'DPO pairs')} to {args.dpo}" if args.dpo else None]
    skipped = f"skipped {counts['skipped']}" + (f" (ids {counts['skipped_ids']})" if counts["skipped"] else "")
    print(f"wrote {', '.join(p for p in parts if p)}; {skipped}")
    return counts


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
