"""Feedback from the chat page: POST /v1/feedback stores a judgment of one answer in a database.

    POST /v1/feedback  {"messages": [...up to the user's last turn], "response": "<the answer>",
                        "rating": "up" | "down" | null, "edit": "<a better answer>" | null, "model": optional}
                    -> {"id": 7, "object": "feedback"}

One row per request (table `feedback`): id, created (UTC ISO 8601), messages (JSON text), response,
rating, edit, model (the name this server serves) and weight_version (`weight_version()`: which
weights gave the answer). The client's address is not stored. `export()` turns the rows into KTO
rows and DPO pairs (`scripts/export_feedback.py`).

Any SQLAlchemy URL works; a plain path is a SQLite file, opened in WAL mode with a busy timeout so
that concurrent requests (each write runs in a worker thread, off the event loop) wait for each other
instead of failing. sqlalchemy is imported lazily (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from coati_ray.errors import ConfigError, MissingExtraError
from coati_ray.serve.api import APIError, Message, Text

logger = logging.getLogger(__name__)

DEFAULT_DB_NAME = "feedback.sqlite"  # in the served model's directory
CONNECT_TIMEOUT_S = 10  # a database server (PostgreSQL) that does not answer
SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another one's lock, then the request gets 503
# what identifies the weights when the directory names no run: config + weight files (names, sizes, mtimes)
_WEIGHT_GLOBS = ("config.json", "*.safetensors", "*.bin", "*.pt")


class FeedbackRequest(BaseModel):
    messages: list[Message] = Field(min_length=1)
    response: Text = Field(min_length=1)
    rating: Literal["up", "down"] | None = None
    edit: Text | None = None
    model: Text | None = None


def _sqlalchemy():
    try:
        import sqlalchemy
    except ImportError:
        raise MissingExtraError("sqlalchemy", "serve", "the chat page's feedback store (--feedback_db)") from None
    return sqlalchemy


def to_url(db: str) -> str:
    """A SQLAlchemy URL as it is, a plain path as a SQLite file URL."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


def weight_version(model_dir: str | Path) -> str:
    """Which weights a directory holds: "<run_id>@step<N>" from the run's train_summary.json or
    ppo_summary.json, "<run_id>" from run.json alone, else "files-<12 hex>": a hash of the names,
    sizes and mtimes of its config and weight files (changes when the weights are saved again)."""
    d = Path(model_dir)
    for name in ("train_summary.json", "ppo_summary.json", "run.json"):
        try:
            info = json.loads((d / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("run_id"):
            steps = info.get("steps")
            return f"{info['run_id']}@step{steps}" if isinstance(steps, int) else str(info["run_id"])
    h = hashlib.sha256()
    for f in sorted({p for g in _WEIGHT_GLOBS for p in d.glob(g) if p.is_file()}):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"files-{h.hexdigest()[:12]}"


class FeedbackStore:
    """The `feedback` table behind a SQLAlchemy engine. `create=False` opens an existing one read-only
    in effect (export): nothing is created, the journal mode is left as it is."""

    def __init__(self, db: str, model_name: str = "", weight_version: str = "", create: bool = True):
        sa = _sqlalchemy()
        self.url, self.model_name, self.weight_version = to_url(db), model_name, weight_version
        md = sa.MetaData()
        self.table = sa.Table(
            "feedback", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("created", sa.String(40), nullable=False),  # UTC, ISO 8601
            sa.Column("messages", sa.Text, nullable=False),  # JSON: [{"role", "content"}, ...]
            sa.Column("response", sa.Text, nullable=False),
            sa.Column("rating", sa.String(8), nullable=True),  # "up" | "down" | NULL
            sa.Column("edit", sa.Text, nullable=True),
            sa.Column("model", sa.String(255), nullable=False),
            sa.Column("weight_version", sa.String(255), nullable=False),
        )
        flag, sqlite = ("feedback_db" if create else "db"), self.url.split(":", 1)[0].split("+")[0] == "sqlite"
        try:
            url = sa.make_url(self.url)
            if sqlite and not create and not (url.database and Path(url.database).is_file()):
                raise ConfigError(flag, f"{url.database}: no such SQLite file")
            connect: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000} if sqlite else {}
            if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
                connect["connect_timeout"] = CONNECT_TIMEOUT_S  # an unreachable host fails, not hangs
            self.engine = sa.create_engine(url, connect_args=connect)
            if sqlite:
                @sa.event.listens_for(self.engine, "connect")
                def _pragmas(conn, _record):
                    cur = conn.cursor()
                    if create:  # WAL: readers never block the writer (the mode stays in the file)
                        cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                    cur.close()
            if create:
                md.create_all(self.engine)
            elif not sa.inspect(self.engine).has_table("feedback"):
                raise ConfigError(flag, f"{_shown(url)}: has no feedback table (not a feedback database)")
        except (sa.exc.SQLAlchemyError, ImportError) as e:  # a bad URL, a missing driver, a path not writable
            where = _shown(self.url) + (" (is the directory writable?)" if create and sqlite else "")
            hint = ("; give another path or URL with --feedback_db, or --feedback_db none to turn feedback off"
                    if create else "")
            reason = " ".join(str(getattr(e, "orig", None) or e).split())  # one line (drivers' messages wrap)
            raise ConfigError(flag, f"cannot open the feedback database {where}: {reason}{hint}") from None

    def add(self, messages: list[dict], response: str, rating: str | None, edit: str | None) -> int:
        """Store one judgment; its id. Blocking: call it from a worker thread in a server."""
        row = {"created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
               "messages": json.dumps(messages, ensure_ascii=False), "response": response, "rating": rating,
               "edit": edit, "model": self.model_name, "weight_version": self.weight_version}
        with self.engine.begin() as conn:
            return int(conn.execute(self.table.insert().values(**row)).inserted_primary_key[0])

    def rows(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every row as stored (messages as JSON text), oldest first; only `model`'s when given."""
        q = self.table.select().order_by(self.table.c.id)
        if model is not None:
            q = q.where(self.table.c.model == model)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def close(self) -> None:
        self.engine.dispose()

    def add_route(self, app, model_name: str) -> None:
        """POST /v1/feedback on `app` (made by `api.create_app`, whose handlers give errors OpenAI's shape);
        rows name `model_name`, the model the app serves."""
        self.model_name = model_name

        @app.post("/v1/feedback")
        async def feedback(body: FeedbackRequest):
            check(body, model_name)
            messages = [m.model_dump() for m in body.messages]
            try:  # off the event loop: a write waiting for SQLite's lock must not stall generation
                fid = await asyncio.to_thread(self.add, messages, body.response, body.rating, body.edit)
            except _sqlalchemy().exc.SQLAlchemyError as e:
                logger.error("feedback not stored: %s", e)
                raise APIError(503, f"the feedback database could not store it ({type(e).__name__}); try again",
                               code="feedback_store_unavailable", kind="server_error") from None
            return {"id": fid, "object": "feedback"}


def _shown(url) -> str:
    """A URL to print: a SQLite file as its path, others without their password."""
    sa = _sqlalchemy()
    try:
        u = sa.make_url(str(url)) if isinstance(url, str) else url
    except sa.exc.ArgumentError:
        return str(url)
    return str(u.database) if u.get_backend_name() == "sqlite" else u.render_as_string(hide_password=True)


def check(body: FeedbackRequest, model_name: str) -> None:
    """What the types do not say: the conversation ends with the user's turn, something is judged."""
    if body.messages[-1].role != "user":
        raise APIError(400, f"messages: the last message must be the user's turn (the answer goes in 'response'), "
                       f"got role '{body.messages[-1].role}'", "messages", "invalid_value")
    if body.rating is None and body.edit is None:
        raise APIError(400, "give a rating ('up' or 'down'), an edit (the better answer), or both", "rating",
                       "missing")
    if body.edit is not None and not body.edit.strip():
        raise APIError(400, "edit: the better answer is empty (send null for no edit)", "edit", "invalid_value")
    if body.model is not None and body.model != model_name:
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")


def _prompt(raw: str) -> list[dict] | None:
    """The stored messages as a list of {"role", "content"} strings, or None when unreadable."""
    try:
        msgs = json.loads(raw)
    except (TypeError, ValueError):
        return None
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
    return msgs if ok else None


def export(db: str, kto_path: str | None, dpo_path: str | None, model: str | None = None) -> dict[str, Any]:
    """Write the feedback as JSON lines: a KTO row per thumbs judgment ({"prompt": messages,
    "completion", "label": up}) and a DPO pair per edit that differs from the answer ({"prompt",
    "chosen": edit, "rejected": answer}), each with id, model, weight_version. A row whose messages
    are unreadable is skipped and named in "skipped_ids"; the database is only read."""
    store = FeedbackStore(db, create=False)
    try:
        rows = store.rows(model)
    finally:
        store.close()
    kto, dpo, skipped = [], [], []
    for r in rows:
        prompt = _prompt(r["messages"])
        if prompt is None:
            skipped.append(r["id"])
            logger.warning("feedback row %s: its messages are not a readable JSON list of {role, content}; skipped",
                           r["id"])
            continue
        tail = {"id": r["id"], "model": r["model"], "weight_version": r["weight_version"]}
        if r["rating"] in ("up", "down"):
            kto.append({"prompt": prompt, "completion": r["response"], "label": r["rating"] == "up", **tail})
        if r["edit"] and r["edit"].strip() != r["response"].strip():
            dpo.append({"prompt": prompt, "chosen": r["edit"], "rejected": r["response"], **tail})
    for path, out in ((kto_path, kto), (dpo_path, dpo)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in out)
    return {"kto": len(kto), "dpo": len(dpo), "skipped": len(skipped), "skipped_ids": skipped, "rows": len(rows)}
