"""WORKERS: the model in a process of its own (starsql.serve.engine_server, an OpenAI-compatible endpoint), several
app processes in front of it, and the router that keeps each user on one of them (starsql.serve.workers). Real
processes on 127.0.0.1 with the tiny model and its trained adapter."""

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import pytest

from starsql.prompt import build_prompt
from starsql.serve.decode import BackendError, stream_sql
from starsql.serve.load import load_for_inference
from starsql.serve.remote import RemoteBackend
from servers import free_port
from test_app import ROOT, app_env

PROMPT = build_prompt("CREATE TABLE singer (name VARCHAR, age INTEGER)", "Names of singers older than 30?")
SCHEMA = "CREATE TABLE singer (singer_id INTEGER, name VARCHAR, age INTEGER);"


@pytest.fixture(scope="module")
def engine(tiny_run, tmp_path_factory):
    """`python -m starsql.serve.engine_server` with the app's model, until /health answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("engine") / "engine.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "starsql.serve.engine_server", "--base_model", "tiny-starcoder2",
                                    "--adapter", str(tiny_run), "--port", str(port)], cwd=ROOT, env=app_env(tiny_run),
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_engine_streams_what_the_app_generates_and_counts_it(engine, tiny_run):
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    backend = RemoteBackend(engine, model=str(tiny_run))
    before = backend.usage()
    pieces = list(backend.stream(PROMPT, 24))
    *_, local = stream_sql(model, tokenizer, PROMPT, max_new_tokens=24)
    assert len(pieces) > 1 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # streamed, growing
    assert pieces[-1] == local  # greedy: the same answer as in the app's own process
    after = backend.usage()
    assert after["answers"] == before["answers"] + 1 and after["tokens"] > before["tokens"]
    # Another endpoint has no /usage of ours: the app then counts nothing rather than failing.
    assert RemoteBackend(f"http://127.0.0.1:{free_port()}", model="x").usage() is None


def test_the_engine_answers_requests_sent_together_as_each_alone(engine, tiny_run):
    backend = RemoteBackend(engine, model="any")
    prompts = [build_prompt(SCHEMA, question) for question in ("How many singers?", "Oldest singer?", "Names?")]
    alone = [list(backend.stream(prompt, 16))[-1] for prompt in prompts]
    together = [None] * len(prompts)

    def ask(i):
        together[i] = list(backend.stream(prompts[i], 16))[-1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert together == alone


def test_the_engine_refuses_a_bad_request_with_what_to_fix(engine):
    def post(body):
        return httpx.post(f"{engine}/v1/completions", json=body, timeout=30)

    for body, words in (({"prompt": PROMPT, "max_tokens": 0}, "`max_tokens` must be"),
                        ({"prompt": "", "max_tokens": 4}, "`prompt` must be"),
                        ({"prompt": PROMPT, "temperature": "hot"}, "`temperature` must be"),
                        (["not", "an", "object"], "JSON object")):  # fmt: skip
        reply = post(body)
        assert reply.status_code == 400 and words in reply.json()["error"]["message"], (body, reply.text)
    whole = post({"prompt": PROMPT, "max_tokens": 8, "temperature": 0})  # not streamed: one JSON answer
    assert whole.status_code == 200 and isinstance(whole.json()["choices"][0]["text"], str)
    assert httpx.get(f"{engine}/health").json()["concurrency"] >= 1


def started_workers(tiny_run, log_path):
    """`WORKERS=2 python app.py` as a process of its own, once it serves: (the launcher, its child processes)."""
    import psutil

    port = free_port()
    env = {**app_env(tiny_run), "WORKERS": "2", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with open(log_path, "w") as log:
        launcher = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while "serving on" not in log_path.read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    children = psutil.Process(launcher.pid).children()
    assert len(children) == 3  # the model's process and two app processes
    return launcher, children


def all_gone(processes, seconds: float) -> bool:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return not alive


def launcher_port(log_path) -> int:
    import re

    return int(re.search(r"serving on http://[\d.]+:(\d+)", log_path.read_text()).group(1))


class StandIn:
    """A backend that takes no model: `stream` waits `hold_s`, then yields "SELECT 1" letter by letter; with `fail`,
    it raises that after the first letter. One answer at a time, as plain generate() serves."""

    concurrency = 1

    def __init__(self, hold_s: float = 0.0, fail: Exception | None = None):
        self.hold_s, self.fail = hold_s, fail

    def stream(self, prompt, max_new_tokens, temperature=0.0):
        time.sleep(self.hold_s)
        text = ""
        for letter in "SELECT 1":
            text += letter
            yield text
            if self.fail is not None:
                raise self.fail


@contextlib.contextmanager
def running(server):
    """A uvicorn server (its config's port) run in a thread of this process: its URL, until stopped."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serving(backend, keep_alive_s: float, **options):
    """starsql.serve.engine_server's app over `backend`, served by uvicorn on a free port in this process."""
    import uvicorn

    from starsql.serve.engine_server import build_app

    config = uvicorn.Config(build_app(backend, "stand-in", keep_alive_s, **options), host="127.0.0.1", port=free_port(),
                            log_level="warning")  # fmt: skip
    with running(uvicorn.Server(config)) as url:
        yield url


def test_a_request_waiting_for_the_model_is_kept_alive_not_timed_out():
    # One answer at a time, each taking 1.5 s; the client gives up after 0.8 s of silence. The second request
    # waits 1.5 s for its turn, hearing a keep-alive comment every 0.2 s, and gets its answer.
    with serving(StandIn(hold_s=1.5), keep_alive_s=0.2) as url:
        backend = RemoteBackend(url, model="stand-in", timeout=0.8)
        answers = [None, None]

        def ask(i):
            answers[i] = list(backend.stream(PROMPT, 16))[-1]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert answers == ["SELECT 1", "SELECT 1"]


def test_a_client_that_leaves_while_waiting_gives_its_turn_back():
    # One answer at a time. A second client waits (hearing keep-alives), then leaves; the third is answered once the
    # first is done: the slot the second waited for is not lost.
    with serving(StandIn(hold_s=1.0), keep_alive_s=0.1) as url:
        backend = RemoteBackend(url, model="stand-in", timeout=5)
        first = threading.Thread(target=lambda: list(backend.stream(PROMPT, 16)))
        first.start()
        time.sleep(0.2)
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "stream": True},
                          timeout=5) as waiting:  # fmt: skip
            assert next(waiting.iter_lines()) == ": waiting"
        first.join(10)
        third = []  # in a thread: with its turn lost it would wait forever, kept alive
        threading.Thread(target=lambda: third.append(list(backend.stream(PROMPT, 16))[-1]), daemon=True).start()
        deadline = time.monotonic() + 10
        while not third and time.monotonic() < deadline:
            time.sleep(0.05)
        assert third == ["SELECT 1"]


def test_a_model_that_fails_while_answering_is_reported_as_such():
    with serving(StandIn(fail=RuntimeError("CUDA out of memory")), keep_alive_s=5) as url:
        with pytest.raises(BackendError, match="failed while answering: The model failed: RuntimeError: CUDA out of memory"):
            list(RemoteBackend(url, model="stand-in").stream(PROMPT, 16))
        whole = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}, timeout=30)
        assert whole.status_code == 500 and "CUDA out of memory" in whole.json()["error"]["message"]


class Paced:
    """A backend that writes `letters` x's, `pause_s` apart (the first after `hold_s`), then ends at once."""

    concurrency = 4

    def __init__(self, letters: int, pause_s: float, hold_s: float = 0.0):
        self.letters, self.pause_s, self.hold_s = letters, pause_s, hold_s

    def stream(self, prompt, max_new_tokens, temperature=0.0):
        time.sleep(self.hold_s)
        for letter in range(1, self.letters + 1):
            if letter > 1:
                time.sleep(self.pause_s)
            yield "x" * letter


def streamed_chunks(url: str) -> tuple[list[tuple[float, str]], float]:
    """(each streamed chunk's text, with when it came in seconds after sending), and when the stream ended."""
    sent, chunks = time.monotonic(), []
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 64, "stream": True},
                      timeout=30) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {") and (text := json.loads(line[6:])["choices"][0]["text"]):
                chunks.append((time.monotonic() - sent, text))
    return chunks, time.monotonic() - sent


def test_the_engine_sends_the_first_piece_at_once_then_what_came_meanwhile_each_interval():
    # 21 letters over 0.4 s. With a 0.1 s interval: the first letter alone, then a few chunks of several letters,
    # each at least the interval after the one before.
    with serving(Paced(21, 0.02), keep_alive_s=5, stream_interval_s=0.1) as url:
        chunks, _ = streamed_chunks(url)
    texts = [text for _, text in chunks]
    assert texts[0] == "x" and "".join(texts) == "x" * 21 and 3 <= len(texts) <= 7, texts
    assert all(later - earlier >= 0.09 for (earlier, _), (later, _) in zip(chunks[:-1], chunks[1:-1])), chunks
    # Interval 0: a chunk as each letter comes.
    with serving(Paced(21, 0.02), keep_alive_s=5, stream_interval_s=0) as url:
        chunks, _ = streamed_chunks(url)
    assert "".join(text for _, text in chunks) == "x" * 21 and len(chunks) > 10, chunks


def test_the_end_of_an_answer_is_not_held_back_by_the_interval_and_its_first_piece_is_timed():
    # The first letter after 0.3 s of the model's, the next two 0.05 s apart, then the end: they go at once with
    # the end, not after the 2 s interval. /usage counts the request's wait for its first piece.
    with serving(Paced(3, 0.05, hold_s=0.3), keep_alive_s=5, stream_interval_s=2.0) as url:
        before = httpx.get(f"{url}/usage").json()["first_piece"]
        chunks, ended = streamed_chunks(url)
        after = httpx.get(f"{url}/usage").json()["first_piece"]
    assert [text for _, text in chunks] == ["x", "xx"] and ended < 1.5, (chunks, ended)
    assert after["count"] == before["count"] + 1 and 0.3 <= after["recent_s"][-1] < 1.5


def test_the_router_lets_go_of_a_stream_its_user_left_and_ends_open_ones_when_it_stops():
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from starsql.serve.workers import router_app, router_server

    ended = []  # the app process's streams that ended, by who read them

    async def events(request):  # an event stream that never ends by itself, as a page's does
        async def beats():
            try:
                while True:
                    yield b": beat\n\n"
                    await asyncio.sleep(0.05)
            finally:
                ended.append(request.query_params["who"])

        return StreamingResponse(beats(), media_type="text/event-stream")

    app_process = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/stream", events)]), host="127.0.0.1",
                                                port=free_port(), log_level="warning"))  # fmt: skip
    with running(app_process) as upstream:
        router = router_app([upstream])
        server = router_server(router, host="127.0.0.1", port=free_port(), log_level="warning",
                               timeout_graceful_shutdown=30)  # fmt: skip
        with running(server) as url:
            with httpx.stream("GET", f"{url}/stream?who=left", timeout=10) as response:
                next(response.iter_raw())
            deadline = time.monotonic() + 10
            while "left" not in ended or router.state.relaying:  # the user left: the router let go of its stream
                assert time.monotonic() < deadline, (ended, router.state.relaying)
                time.sleep(0.05)
            with httpx.stream("GET", f"{url}/stream?who=stayed", timeout=10) as response:
                chunks = response.iter_raw()
                next(chunks)
                server.should_exit = True
                started = time.monotonic()
                rest = b"".join(chunks)  # ends as a finished stream does: a cut one raises here
            assert rest.count(b": beat") < 100 and time.monotonic() - started < 10  # well before the grace period
    assert "stayed" in ended


@pytest.fixture(scope="module")
def workers(tiny_run, tmp_path_factory):
    """`WORKERS=2 python app.py`: the model's process, two app processes and the router. The module's last test
    stops it; killed afterwards if a test failed first."""
    log_path = tmp_path_factory.mktemp("workers") / "app.log"
    launcher, children = started_workers(tiny_run, log_path)
    try:
        yield launcher, children, f"http://127.0.0.1:{launcher_port(log_path)}/", log_path
    finally:
        launcher.kill()
        all_gone(children, 30)


@pytest.fixture
def workers_url(workers):
    return workers[2]


def test_two_app_processes_answer_through_one_address_with_one_model(workers_url):
    from gradio_client import Client

    clients = [Client(workers_url, verbose=False) for _ in range(2)]
    # The router sets its cookie on the first response; gradio_client sends it with every later request.
    assert sorted(c.cookies.get("starsql_worker") for c in clients) == ["0", "1"]
    before = clients[0].predict(api_name="/usage")
    replies = [c.predict("How many singers are there?", SCHEMA, [], 24, 0.0, "sqlite", None, api_name="/chat")
               for c in clients]  # fmt: skip
    assert replies[0] == replies[1] and replies[0]  # one model, greedy: the same answer from either app process
    after = clients[1].predict(api_name="/usage")  # the model's process counts every app process's answers
    assert after["answers"] == before["answers"] + 2


def test_the_cookie_decides_which_app_process_answers(workers_url):
    # Half a plain call on process 0, its other half sent with process 1's cookie: process 1 does not know it.
    body = {"data": ["SELECT 1", SCHEMA, "sqlite", None]}
    event = httpx.post(f"{workers_url}gradio_api/call/check", json=body, cookies={"starsql_worker": "0"}).json()["event_id"]
    elsewhere = httpx.get(f"{workers_url}gradio_api/call/check/{event}", cookies={"starsql_worker": "1"}, timeout=30)
    here = httpx.get(f"{workers_url}gradio_api/call/check/{event}", cookies={"starsql_worker": "0"}, timeout=30)
    assert "event: complete" not in elsewhere.text and "event: complete" in here.text


def test_plain_http_calls_reach_the_process_that_holds_them(workers_url):
    # POST /call/<api> gives an event id that only the app process that took the POST knows; the GET that reads
    # the answer comes without cookie or session, and the router sends it to that process.
    for _ in range(4):
        body = json.dumps({"data": ["SELECT count(*) FROM singer", SCHEMA, "sqlite", None]}).encode()
        request = urllib.request.Request(f"{workers_url}gradio_api/call/check", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as reply:
            event_id = json.loads(reply.read())["event_id"]
        with urllib.request.urlopen(f"{workers_url}gradio_api/call/check/{event_id}", timeout=60) as reply:
            last = reply.read().decode().strip().split("\n\n")[-1]
        assert last.startswith("event: complete") and '"valid": true' in last, last


def test_a_file_uploaded_to_one_app_process_is_found_by_another(workers_url, tmp_path):
    path = tmp_path / "shop.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE item (id INTEGER, name TEXT); INSERT INTO item VALUES (1, 'a'), (2, 'b');")
    conn.close()
    # No cookie: the upload and the call that uses it take consecutive turns, i.e. the two app processes.
    with open(path, "rb") as file:
        uploaded = httpx.post(f"{workers_url}gradio_api/upload", files={"files": ("shop.sqlite", file)}, timeout=60)
    assert uploaded.status_code == 200, uploaded.text
    database = {"path": uploaded.json()[0], "orig_name": "shop.sqlite", "meta": {"_type": "gradio.FileData"}}
    body = {"data": ["SELECT count(*) FROM item", "", "sqlite", database]}
    event_id = httpx.post(f"{workers_url}gradio_api/call/check", json=body, timeout=60).json()["event_id"]
    last = httpx.get(f"{workers_url}gradio_api/call/check/{event_id}", timeout=60).text.strip().split("\n\n")[-1]
    assert last.startswith("event: complete"), last
    assert json.loads(last.split("data: ", 1)[1])[0]["rows"] == [[2]]


def test_workers_without_the_openai_package_stop_at_once_and_say_what_to_install(tiny_run, tmp_path):
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**app_env(tiny_run), "WORKERS": "2", "PYTHONPATH": str(tmp_path), "GRADIO_SERVER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs the `openai` package: pip install -r requirements.txt" in done.stderr


def test_when_the_model_process_dies_the_app_stops_with_an_error_and_leaves_nothing(tiny_run, tmp_path):
    launcher, children = started_workers(tiny_run, tmp_path / "app.log")
    try:
        engine = next(c for c in children if "engine_server" in " ".join(c.cmdline()))
        engine.kill()  # a crash: whatever restarts the app (a Space) must see it end
        assert launcher.wait(timeout=40) == 1
        assert "The model's process ended" in (tmp_path / "app.log").read_text()
        assert all_gone(children, 10)
    finally:
        launcher.kill()


def test_a_killed_launcher_takes_its_processes_with_it(tiny_run, tmp_path):
    launcher, children = started_workers(tiny_run, tmp_path / "app.log")
    launcher.kill()  # SIGKILL runs no cleanup: the children end through the death signal they asked for
    launcher.wait()
    assert all_gone(children, 30)


def test_a_terminated_launcher_stops_its_processes_and_ends_cleanly(workers):
    # The module's last test: it stops the shared launcher.
    from gradio_client import Client

    launcher, children, url, log_path = workers
    client = Client(url, verbose=False)  # its open event stream must not hold the shutdown
    client.predict(api_name="/usage")
    logged = len(log_path.read_text())
    launcher.terminate()
    assert launcher.wait(timeout=40) == 0
    assert all_gone(children, 10)
    stopping = log_path.read_text()[logged:]  # the router ended the open stream itself: nothing cut, no crash shown
    assert "Traceback" not in stopping and "timeout graceful shutdown exceeded" not in stopping, stopping[-3000:]

