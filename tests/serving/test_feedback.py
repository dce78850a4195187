"""The chat page's feedback loop: POST /v1/feedback stores a judgment (SQLite in WAL mode, or any
SQLAlchemy URL: a throwaway PostgreSQL when `initdb` is installed), `scripts/export_feedback.py`
turns the rows into KTO rows and DPO pairs, and the page's 👍 / 👎 / edit in headless Chromium
drive it all through the real launcher.

The API tests serve `create_app` over the micro model with uvicorn in a thread of this process (real
HTTP, the real event loop, writes in worker threads); the rows are read back with `sqlite3`, apart
from the code that wrote them."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests

pytest.importorskip("sqlalchemy", reason="the feedback store needs sqlalchemy: pip install 'coati_ray[serve]'")

ROOT = Path(__file__).resolve().parents[2]
KEY = "feedback-key-789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TURN = [{"role": "user", "content": "小明有3个苹果，又买了5个。一共有多少个？"}]
GOOD = {"messages": TURN, "response": "7个", "rating": "down", "edit": "一共有8个苹果。", "model": "micro"}
COLUMNS = ["id", "created", "messages", "response", "rating", "edit", "model", "weight_version"]


@contextlib.contextmanager
def serving(app, timeout_s: float = 60.0):
    """`app` on a free port of 127.0.0.1 by uvicorn in a daemon thread: its base URL."""
    import uvicorn

    from coati_ray.serve.process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, f"uvicorn did not start within {timeout_s} s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop within 30 s"


@pytest.fixture(scope="module")
def engine(micro_model):
    from coati_ray.models.loading import load_causal_lm, load_tokenizer
    from coati_ray.serve.engine import BatchingEngine

    return BatchingEngine(load_causal_lm(micro_model), load_tokenizer(micro_model), max_batch_size=4)


@pytest.fixture(scope="module")
def api(engine, micro_model, tmp_path_factory):
    """The app with a key and a feedback store in a fresh SQLite file."""
    from coati_ray.serve.api import create_app
    from coati_ray.serve.feedback import FeedbackStore, weight_version

    db = tmp_path_factory.mktemp("feedback") / "feedback.sqlite"
    store = FeedbackStore(str(db), weight_version=weight_version(micro_model))
    with serving(create_app(engine, "micro", 256, api_key=KEY, feedback=store)) as base:
        yield {"base": base, "db": db, "version": store.weight_version}
    store.close()


def post(base: str, body, headers: dict | None = AUTH) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{base}/v1/feedback", data=data, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def rows(db: Path, where: str = "", args=()) -> list[dict]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM feedback {where} ORDER BY id", args)]


def openai_error(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------------------ the endpoint
def test_a_judgment_is_stored_with_the_served_model_and_its_weights(api):
    up = post(api["base"], {"messages": TURN, "response": "8个", "rating": "up"})
    assert up.status_code == 200, up.text
    assert set(up.json()) == {"id", "object"} and up.json()["object"] == "feedback" and type(up.json()["id"]) is int
    convo = [{"role": "system", "content": "Be brief."}, *TURN, {"role": "assistant", "content": "7个"},
             {"role": "user", "content": "再算一次"}]
    edited = post(api["base"], {**GOOD, "messages": convo})
    assert edited.status_code == 200 and edited.json()["id"] != up.json()["id"]

    got = {r["id"]: r for r in rows(api["db"], "WHERE id IN (?, ?)", (up.json()["id"], edited.json()["id"]))}
    a, b = got[up.json()["id"]], got[edited.json()["id"]]
    assert list(a) == COLUMNS  # and so no client address
    assert (a["rating"], a["edit"], a["response"]) == ("up", None, "8个")
    assert (b["rating"], b["edit"], b["response"]) == ("down", "一共有8个苹果。", "7个")
    assert json.loads(a["messages"]) == TURN and json.loads(b["messages"]) == convo
    assert "小明" in a["messages"]  # stored as text, not \u-escaped
    assert a["model"] == b["model"] == "micro" and a["weight_version"] == api["version"]
    assert api["version"].startswith("files-")  # the preset names no run: a hash of its files
    created = datetime.fromisoformat(a["created"])
    assert created.utcoffset() == timedelta(0) and abs(datetime.now(created.tzinfo) - created) < timedelta(minutes=5)


@pytest.mark.parametrize("body,status,param,code", [
    ({"response": "8", "rating": "up"}, 400, "messages", "missing"),
    ({"messages": [], "response": "8", "rating": "up"}, 400, "messages", "too_short"),
    ({**GOOD, "messages": [*TURN, {"role": "assistant", "content": "8"}]}, 400, "messages", "invalid_value"),
    ({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "literal_error"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "string_type"),
    ({**GOOD, "messages": [{"role": "user"}]}, 400, "messages.0.content", "missing"),
    ({"messages": TURN, "response": "8"}, 400, "rating", "missing"),
    ({"messages": TURN, "response": "8", "rating": None, "edit": None}, 400, "rating", "missing"),
    ({**GOOD, "rating": "meh"}, 400, "rating", "literal_error"),
    ({**GOOD, "rating": True}, 400, "rating", "literal_error"),
    ({**GOOD, "response": ""}, 400, "response", "string_too_short"),
    ({**GOOD, "edit": "  "}, 400, "edit", "invalid_value"),
    ({**GOOD, "edit": 3}, 400, "edit", "string_type"),
    ({**GOOD, "model": "gpt-5"}, 404, "model", "model_not_found"),
    ('{"messages": [', 400, None, None),
    ('["not", "an", "object"]', 400, None, None),
])
def test_bad_bodies_get_a_4xx_in_openai_shape_and_store_nothing(api, body, status, param, code):
    before = len(rows(api["db"]))
    err = openai_error(post(api["base"], body), status)
    assert err["param"] == param
    if code:
        assert err["code"] == code
    assert len(rows(api["db"])) == before
    assert post(api["base"], GOOD).status_code == 200  # still storing


def test_feedback_needs_the_api_key(api):
    before = len(rows(api["db"]))
    for headers in (None, {"Authorization": "Bearer wrong"}):
        r = post(api["base"], GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert len(rows(api["db"])) == before


def test_32_concurrent_posts_are_all_stored_with_unique_ids(api):
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: post(api["base"], {**GOOD, "response": f"concurrent {i}"}), range(32)))
    assert [r.status_code for r in answers] == [200] * 32, [r.text for r in answers if r.status_code != 200]
    ids = [r.json()["id"] for r in answers]
    assert len(set(ids)) == 32
    stored = rows(api["db"], "WHERE response LIKE 'concurrent %'")
    assert sorted(r["id"] for r in stored) == sorted(ids)
    assert {r["response"] for r in stored} == {f"concurrent {i}" for i in range(32)}
    with contextlib.closing(sqlite3.connect(api["db"])) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_without_a_store_the_endpoint_is_a_404_in_openai_shape(engine):
    from coati_ray.serve.api import create_app

    with serving(create_app(engine, "micro", 256)) as base:
        err = openai_error(post(base, GOOD, headers=None), 404)
        assert err["code"] == "not_found" and "/v1/feedback" in err["message"]


# ------------------------------------------------------------------------------------------ the launcher
def _launcher():
    return importlib.import_module("coati_ray.commands.serve")  # launchers/serve.py runs this module


def test_the_launcher_stores_beside_the_model_records_its_run_and_none_turns_it_off(tmp_path):
    serve = _launcher()
    (tmp_path / "train_summary.json").write_text(json.dumps({"stage": "sft", "steps": 12, "run_id": "ab12cd"}))
    store = serve.open_feedback(serve.parse_args([str(tmp_path)]))
    try:
        assert store.weight_version == "ab12cd@step12"
        assert store.url == f"sqlite:///{(tmp_path / 'feedback.sqlite').resolve()}"
        store.add(TURN, "8", "up", None)
        assert rows(tmp_path / "feedback.sqlite")[0]["weight_version"] == "ab12cd@step12"
    finally:
        store.close()
    assert serve.open_feedback(serve.parse_args([str(tmp_path), "--feedback_db", "none"])) is None


def test_a_database_that_cannot_be_made_stops_the_launcher_with_one_line(micro_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "feedback.sqlite"  # a path under a file: no one can create it, root included
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "serve.py"), micro_model, "--port", "0",
                        "--feedback_db", str(bad)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in p.stderr
    assert f"--feedback_db: cannot open the feedback database {bad}" in errors[0] and "--feedback_db none" in errors[0]


def test_the_weight_version_names_the_run_or_hashes_the_weight_files(tmp_path):
    from coati_ray.serve.feedback import weight_version

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    v = weight_version(tmp_path)
    assert v.startswith("files-") and len(v) == len("files-") + 12
    (tmp_path / "feedback.sqlite").write_bytes(b"not weights")
    assert weight_version(tmp_path) == v  # the database beside the model is no part of it
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))  # saved again
    assert weight_version(tmp_path) != v
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r1", "stage": "ppo"}))
    assert weight_version(tmp_path) == "r1"
    (tmp_path / "ppo_summary.json").write_text(json.dumps({"steps": 30, "run_id": "r1"}))
    assert weight_version(tmp_path) == "r1@step30"


# ------------------------------------------------------------------------------------------ the export
def fill(url: str) -> list[int]:
    """Six judgments, through the store: ids in order."""
    from coati_ray.serve.feedback import FeedbackStore

    convo = [*TURN, {"role": "assistant", "content": "7个"}, {"role": "user", "content": "再算一次"}]
    store = FeedbackStore(url, weight_version="run9@step3")
    try:
        return [store.add(*row) for row in [
            (TURN, "8个", "up", None),
            (convo, "7个", "down", None),
            (TURN, "7个", None, "一共有8个苹果。"),   # an edit: a DPO pair
            (TURN, "8个", None, " 8个\n"),           # the answer unchanged: no pair
            (convo, "9", "down", "8"),               # both: a KTO row and a DPO pair
        ]]
    finally:
        store.close()


def expected(ids: list[int], model: str = "") -> tuple[list[dict], list[dict]]:
    convo = [*TURN, {"role": "assistant", "content": "7个"}, {"role": "user", "content": "再算一次"}]
    tail = {"model": model, "weight_version": "run9@step3"}
    kto = [{"prompt": TURN, "completion": "8个", "label": True, "id": ids[0], **tail},
           {"prompt": convo, "completion": "7个", "label": False, "id": ids[1], **tail},
           {"prompt": convo, "completion": "9", "label": False, "id": ids[4], **tail}]
    dpo = [{"prompt": TURN, "chosen": "一共有8个苹果。", "rejected": "7个", "id": ids[2], **tail},
           {"prompt": convo, "chosen": "8", "rejected": "9", "id": ids[4], **tail}]
    return kto, dpo


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\\u(?!00[01])", text)  # ensure_ascii=False: only control characters are escaped
    return [json.loads(line) for line in text.splitlines()]


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_feedback.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_the_export_writes_exactly_the_kto_rows_and_dpo_pairs_and_skips_unreadable_rows(tmp_path):
    db = tmp_path / "feedback.sqlite"
    ids = fill(str(db))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # rows the store would refuse, put there by hand
        conn.execute("INSERT INTO feedback (created, messages, response, rating, edit, model, weight_version) "
                     "VALUES ('2026-01-01T00:00:00+00:00', '[{\"role\": \"user\"', 'x', 'up', 'y', '', 'v'), "
                     "('2026-01-01T00:00:00+00:00', '{\"role\": \"user\"}', 'x', 'up', NULL, '', 'v'), "
                     "('2026-01-01T00:00:00+00:00', '[]', 'x', 'down', NULL, 'other', 'v')")
    before = rows(db)
    kto, dpo = tmp_path / "out" / "kto.jsonl", tmp_path / "out" / "dpo.jsonl"
    p = export_cli("--db", str(db), "--kto", str(kto), "--dpo", str(dpo))
    assert p.returncode == 0, p.stderr
    assert f"wrote 3 KTO rows to {kto}, 2 DPO pairs to {dpo}; skipped 3" in p.stdout
    assert p.stderr.count("not a readable JSON list") == 3
    assert (read_jsonl(kto), read_jsonl(dpo)) == expected(ids)
    assert rows(db) == before  # read, never altered

    p = export_cli("--db", f"sqlite:///{db}", "--dpo", str(dpo), "--model", "other")
    assert p.returncode == 0 and "wrote 0 DPO pairs" in p.stdout and "skipped 1" in p.stdout
    assert dpo.read_text() == ""
    p = export_cli("--db", str(tmp_path / "missing.sqlite"), "--kto", str(kto))
    assert p.returncode == 2 and "--db:" in p.stderr and "missing.sqlite" in p.stderr
    assert not (tmp_path / "missing.sqlite").exists()  # the export never makes a database


# ------------------------------------------------------------------------------------------ PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port of 127.0.0.1: its SQLAlchemy URL."""
    from coati_ray.serve.process import free_port

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb / pg_ctl; apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (pip install "
                                          "'psycopg[binary]')")
    run_as: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="coati_pg_"))
    if os.geteuid() == 0:  # postgres refuses to run as root: as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(data)
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        if not shutil.which("runuser"):
            shutil.rmtree(data)
            pytest.skip("running as root and there is no runuser to run PostgreSQL as the postgres user")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*args: str, timeout: float) -> None:
        try:
            p = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=timeout, cwd=data)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} did not finish within {timeout} s")
        assert p.returncode == 0, f"{' '.join(args[:2])} failed:\n{p.stdout[-1500:]}{p.stderr[-1500:]}"

    try:
        pg(initdb, "-D", str(data / "db"), "-U", "coati", "--auth=trust", "-E", "UTF8", "--locale=C", timeout=120)
        pg(pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start", timeout=90)
        yield f"postgresql+psycopg://coati@127.0.0.1:{port}/postgres"
    finally:
        if (data / "db" / "postmaster.pid").exists():
            subprocess.run([*run_as, pg_ctl, "-D", str(data / "db"), "-m", "immediate", "-w", "-t", "30", "stop"],
                           capture_output=True, timeout=60, cwd=data)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_store_and_export_round_trip_through_a_sqlalchemy_url(backend, tmp_path, request):
    from coati_ray.serve.feedback import FeedbackStore, export

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'f.db'}"
    ids = fill(url)
    assert ids == sorted(ids) and len(set(ids)) == 5
    store = FeedbackStore(url, create=False)
    try:
        stored = store.rows()
    finally:
        store.close()
    assert [list(r) for r in stored] == [COLUMNS] * 5
    assert [(r["rating"], r["edit"]) for r in stored] == [("up", None), ("down", None), (None, "一共有8个苹果。"),
                                                          (None, " 8个\n"), ("down", "8")]
    assert json.loads(stored[0]["messages"]) == TURN
    kto, dpo = tmp_path / "kto.jsonl", tmp_path / "dpo.jsonl"
    assert export(url, str(kto), str(dpo))["skipped"] == 0
    assert (read_jsonl(kto), read_jsonl(dpo)) == expected(ids)


# ------------------------------------------------------------------------------------------ the page
def test_the_chat_page_sends_thumbs_and_edits_that_export_to_training_data(micro_model, tmp_path):
    """Chat in headless Chromium, 👍 the first answer, 👎 the second and edit it, see a wrong key's
    error on the page; then the rows in the database, the export, and a training step from it."""
    from playwright.sync_api import expect, sync_playwright

    from coati_ray.serve.process import ServerProcess

    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("COATI_REQUIRE_CHROMIUM"):
            pytest.fail("COATI_REQUIRE_CHROMIUM is set but /usr/bin/chromium is missing")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    db = tmp_path / "feedback.sqlite"
    with ServerProcess(micro_model, "--api_key", KEY, "--served_model_name", "micro", "--feedback_db", str(db),
                       log=tmp_path / "server.log") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-quic"])
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            page.fill("#key", KEY)
            page.fill("#max_tokens", "24")  # the micro model is barely trained: short sampled answers
            questions = ["Hello! What is 2 + 3?", "再算一次：4 + 4 = ?"]
            answers = []
            for n, text in enumerate(questions):
                page.fill("#input", text)
                page.click("#send")
                bubble = page.locator(".assistant").nth(n)
                bubble.and_(page.locator("[data-done='true']")).wait_for(timeout=60_000)
                answers.append(bubble.text_content())
                assert answers[-1].strip()
            bars = page.locator(".feedback")
            expect(bars).to_have_count(2, timeout=10_000)

            def judge(bar, control: str, status: str) -> None:
                with page.expect_response("**/v1/feedback", timeout=30_000):
                    bar.locator(control).click()
                expect(bar.locator(".status")).to_have_text(status, timeout=30_000)

            with page.expect_request("**/v1/feedback") as sent:
                judge(bars.nth(0), ".up", "saved")
            assert json.loads(sent.value.post_data) == {
                "model": "micro", "messages": [{"role": "user", "content": questions[0]}], "response": answers[0],
                "rating": "up", "edit": None}
            judge(bars.nth(1), ".down", "saved")
            bars.nth(1).locator("summary").click()
            expect(bars.nth(1).locator(".edit")).to_have_value(answers[1])  # prefilled with the answer
            bars.nth(1).locator(".edit").fill("4 + 4 = 8")
            judge(bars.nth(1), ".submit-edit", "saved")
            page.fill("#key", "wrong-key")  # the server's error message shows; nothing is stored
            bars.nth(0).locator(".down").click()
            expect(bars.nth(0).locator(".status")).to_contain_text("incorrect API key", timeout=30_000)
        finally:
            browser.close()

    second = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": answers[0]},
              {"role": "user", "content": questions[1]}]
    stored = rows(db)
    assert [(json.loads(r["messages"]), r["response"], r["rating"], r["edit"]) for r in stored] == [
        ([{"role": "user", "content": questions[0]}], answers[0], "up", None),
        (second, answers[1], "down", None),
        (second, answers[1], None, "4 + 4 = 8")]
    assert {r["model"] for r in stored} == {"micro"}

    kto, dpo = tmp_path / "out" / "kto.jsonl", tmp_path / "out" / "dpo.jsonl"
    p = export_cli("--db", str(db), "--kto", str(kto), "--dpo", str(dpo))
    assert p.returncode == 0 and f"wrote 2 KTO rows to {kto}, 1 DPO pair to {dpo}; skipped 0" in p.stdout, p.stderr
    assert [(r["completion"], r["label"]) for r in read_jsonl(kto)] == [(answers[0], True), (answers[1], False)]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(dpo)] == [(second, "4 + 4 = 8", answers[1])]

    # the loop closes: one DPO step and one KTO step from the export (the trainer reads this format)
    from coati_ray.serve.feedback import weight_version

    for loss, data in (("dpo", dpo), ("kto", kto)):
        out = tmp_path / f"trained_{loss}"
        p = subprocess.run([sys.executable, str(ROOT / "launchers" / "train_dpo.py"), "--pretrain", micro_model,
                            "--loss", loss, "--dataset", str(data), "--max_steps", "1", "--batch_size", "1",
                            "--eval_split", "0", "--save_path", str(out), "--local"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        assert (out / "model.safetensors").is_file()
        # served next, its feedback would carry this run's id and step
        assert weight_version(out) == f"{json.loads((out / 'train_summary.json').read_text())['run_id']}@step1"
