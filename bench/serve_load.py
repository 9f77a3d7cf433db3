"""The app as users meet it: app.py started as a process, driven over HTTP (/chat, streamed; through gradio_client
and as plain HTTP) by 1, 4 and 16 users at once; the same questions at every count, 64 new tokens at most, greedy. Writes one JSON.

    python3 bench/serve_load.py --out bench/results/serve_load.json                     # GPU: the random StarCoder2-3B
    python3 bench/serve_load.py --smoke --users 1,2 --out /tmp/serve_load_smoke.json    # CPU, tiny model: wiring

Each --app is one start of app.py with its environment (`name=VAR=value,VAR=value`), in order; by default the
batched decoder (its first start, then a restart that finds the compiled artefacts kept by the first) and the
one-stream decoder (DECODE_BATCH=1), all with the same --compile_cache, so a run's numbers sit side by side.
For each start:
- start: seconds from the process's start to its first streamed answer (`answers_after_s`: plain generate()
  while the fast backend warms up), to the log's "Fast decoding is on" line (`eager_ready_after_s`: the eager
  CUDA graphs answer) and "Fast decoding is ready" line (`fast_ready_after_s`: the compiled ones), with the
  build's own seconds to each (`eager_build_s`, `fast_build_s`: after the weights are loaded); `meanwhile`: one
  user's answers one after another until then, by what answered them (plain generate(), the eager graphs), as
  [seconds from the start, tokens, latency]; `gradio_cost`: round trips of /check (a SQL check with no model),
  Gradio's own cost per request (the queue, the event stream) plus a small check.
- per client (--clients: gradio_client, then plain HTTP as the browser calls it) and user count: each user asks
  --rounds questions one after another (user u asks questions u, u + 1, ...
  of the list), all users starting together. tokens = what the model generated during the load, from the app's
  /usage API (the app streams a growing answer at most every CHAT_UPDATE_S, not a token at a time);
  tokens_per_s in all (tokens / wall time), per user (a request's mean tokens x the user's requests / its busy
  time, median), time to the first streamed update p50/p95 (from sending), request latency p50/p95, the
  CPU use (cores) of the app and its child processes (with WORKERS: the model's process and the app processes) over the load, and the batched decoder's own work (`engine`, from /usage: steps,
  requests a step, ms a step, prefills, requests a prefill, its busy share of the wall time).
- `plain_http_ttft`: the same /chat request read as plain HTTP (POST, then its event stream), one user: the
  first update without gradio_client's own polling (it looks for new messages every 50 ms).
Users are processes of their own, so that the client's parsing does not share one Python with the others.
"""

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from common import ROOT, card, ensure_model, free_port

SCHEMA = """\
CREATE TABLE stadium (stadium_id INTEGER, name VARCHAR, location VARCHAR, capacity INTEGER);
CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER, is_male VARCHAR);
CREATE TABLE concert (concert_id INTEGER, concert_name VARCHAR, theme VARCHAR, stadium_id INTEGER, year INTEGER);
CREATE TABLE singer_in_concert (concert_id INTEGER, singer_id INTEGER);
"""
QUESTIONS = [
    "How many singers are there?",
    "List the names of singers older than 40, oldest first.",
    "Which stadium has the largest capacity?",
    "How many concerts took place in each year?",
    "Names of singers who performed in a concert in 2014.",
    "What is the average age of singers from France?",
    "Which concerts were held at stadiums with capacity over 5000?",
    "Count the singers of each country, most first.",
]
WRITING = "Writing SQL"  # app.py's marker of a reply the model is still writing
READY_LINE = "Fast decoding is ready"  # starsql.serve.decode.WarmingBackend's log line: the last build serves
EAGER_LINE = "Fast decoding is on"  # its line when the eager CUDA graphs serve and the compiled ones follow
DEFAULT_APPS = ["batched=DECODE_BATCH=16", "batched-restart=DECODE_BATCH=16", "one-stream=DECODE_BATCH=1"]
DEFAULT_START_ONLY = "batched-restart"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))], 4)


class App:
    """app.py as a process on a free port; its log lines are timed as they come."""

    def __init__(self, model_dir: Path, env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[tuple[float, str]] = []
        self.log = open(log_path, "w")
        full_env = {**os.environ, "BASE_MODEL": str(model_dir), "ADAPTER": "", "GRADIO_ANALYTICS_ENABLED": "False",
                    "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(self.port), "GRADIO_SERVER_NAME": "127.0.0.1",
                    "PYTHONUNBUFFERED": "1", **env}  # fmt: skip
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.perf_counter() - self.started, line))
            self.log.write(line)
            self.log.flush()

    def seen(self, text: str) -> float | None:
        """Seconds from the start to the first log line holding `text`."""
        return next((at for at, line in self.lines if text in line), None)

    def wait_for(self, text: str, timeout: float) -> float | None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and self.process.poll() is None:
            at = self.seen(text)
            if at is not None:
                return at
            time.sleep(0.2)
        return self.seen(text)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)  # its own process group: it and its compile workers
            self.process.wait()
        self.log.close()


# --- the users (worker processes) ---

_clients: dict = {}


def connect(url: str, timeout: float = 600, server_pid: int | None = None):
    """This process's gradio_client Client of the app at `url`, once the app answers HTTP; an error at once if the
    app's process (`server_pid`) has ended meanwhile."""
    import psutil
    from gradio_client import Client

    deadline = time.time() + timeout
    while url not in _clients:
        try:
            _clients[url] = Client(url, verbose=False)
        except Exception:  # noqa: BLE001 -- not up yet
            if time.time() > deadline:
                raise
            if server_pid is not None:
                try:
                    gone = psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                if gone:
                    raise RuntimeError("the app's process ended before it answered HTTP (see its log)") from None
            time.sleep(0.5)
    return _clients[url]


def streamed(job, poll_s: float = 0.005):
    """A gradio_client job's updates as they come. Not `for update in job`: gradio_client 2.7.2's iterator sleeps
    while holding the lock its reader thread needs to add an update, and can starve it for seconds."""
    seen = 0
    while True:
        done = job.done()  # before reading: an update added after this read is read on the next turn
        outputs = job.outputs()
        yield from outputs[seen:]
        seen = len(outputs)
        if done:
            job.result()  # raises if the request failed
            return
        time.sleep(poll_s)


def ask(url: str, question: str, new_tokens: int, iterate: bool = False, server_pid: int | None = None) -> dict:
    """One /chat request, streamed: wall-clock times of sending, the first streamed token and the end. `iterate`:
    read the job with gradio_client's own iterator (`for update in job`), not `streamed`. `server_pid`: see connect."""
    client = connect(url, server_pid=server_pid)
    sent = time.time()
    job = client.submit(message=question, schema=SCHEMA, history=[], max_new_tokens=new_tokens, temperature=0.0,
                        api_name="/chat")  # fmt: skip
    first, updates, last = None, 0, ""
    for update in job if iterate else streamed(job):
        last = update
        if WRITING in update:  # the reply while the model writes
            updates += 1
            first = first or time.time()
    job.result()
    done = time.time()
    return {"sent": sent, "first": first or done, "done": done, "updates": updates, "reply_chars": len(last)}


def ask_http(url: str, question: str, new_tokens: int) -> dict:
    """The same request as plain HTTP, as the browser sends it: POST /chat, then read its event stream."""
    import httpx

    http = _clients.get(("http", url)) or _clients.setdefault(("http", url), httpx.Client(base_url=f"{url}gradio_api/call/chat", timeout=120))
    sent = time.time()
    event = http.post("", json={"data": [question, SCHEMA, [], new_tokens, 0.0, "sqlite", None]}).json()["event_id"]
    first, updates, last, failed = None, 0, "", False
    with http.stream("GET", f"/{event}") as stream:
        for line in stream.iter_lines():
            failed = failed or line.startswith("event: error")
            if line.startswith("data:"):
                if failed:
                    raise RuntimeError(f"/chat answered with an error: {line[5:].strip()[:300]}")
                if WRITING in line:
                    updates += 1
                    first = first or time.time()
                last = line
    done = time.time()
    return {"sent": sent, "first": first or done, "done": done, "updates": updates, "reply_chars": len(last)}


def ask_iterating(url: str, question: str, new_tokens: int) -> dict:
    return ask(url, question, new_tokens, iterate=True)


ASK = {"gradio_client": ask, "gradio_client_iterator": ask_iterating, "http": ask_http}


def ready(url: str, barrier) -> int:
    """Connect this worker's client and make one call (gradio_client reads the API's description on its first),
    then wait for every other user's worker: the loads then time requests, not processes starting."""
    try:
        usage(url)
    except BaseException:
        barrier.abort()  # the other users stop waiting
        raise
    barrier.wait(timeout=600)
    return os.getpid()


def start_users(pool: ProcessPoolExecutor, url: str, users: int):
    """One worker process a user, each connected, before any load (the pool starts processes only as work comes,
    so without this a load's users would start seconds apart, as their processes import torch)."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        barrier = manager.Barrier(users)
        pids = [future.result() for future in [pool.submit(ready, url, barrier) for _ in range(users)]]
    assert len(set(pids)) == users, "each user needs a worker process of its own"


def user(url: str, questions: list[str], new_tokens: int, start_at: float, client: str) -> list[dict]:
    connect(url)
    time.sleep(max(0.0, start_at - time.time()))  # all users start together
    return [ASK[client](url, q, new_tokens) for q in questions]


def usage(url: str) -> dict:
    """The app's count of generated tokens and answers so far."""
    return connect(url).predict(api_name="/usage")


def plain_http_ttft(url: str, question: str, new_tokens: int, repeats: int) -> list[float]:
    """Seconds from sending /chat as plain HTTP to its first streamed update, one request at a time."""
    answers = [ask_http(url, question, new_tokens) for _ in range(repeats)]
    if not all(answer["updates"] for answer in answers):
        raise RuntimeError("/chat streamed no update before its answer")
    return [answer["first"] - answer["sent"] for answer in answers]


def answers_meanwhile(app: "App", new_tokens: int, timeout: float) -> dict:
    """One user's answers, one after another, until the last fast build serves (or `timeout`): by what answered
    (the eager CUDA graphs once their log line is out, plain generate() before), [seconds from the app's start,
    tokens, latency] each."""
    answers: dict[str, list] = {"generate": [], "eager": []}
    deadline = time.perf_counter() + timeout
    while app.seen(READY_LINE) is None and time.perf_counter() < deadline and app.process.poll() is None:
        by = "generate" if app.seen(EAGER_LINE) is None else "eager"
        before = usage(app.url)["tokens"]
        answer = ask(app.url, QUESTIONS[0], new_tokens)
        if by == "generate" and app.seen(EAGER_LINE) is not None:
            continue  # the eager graphs came in during the answer: which one answered is not known
        at = round(answer["done"] - time.time() + time.perf_counter() - app.started, 2)
        answers[by].append([at, usage(app.url)["tokens"] - before, round(answer["done"] - answer["sent"], 3)])
    return answers


def check_round_trips(url: str, repeats: int) -> list[float]:
    """/check with a trivial query: Gradio's own per-request cost, plus a SQLite check of a few ms."""
    client = connect(url)
    times = []
    for _ in range(repeats):
        start = time.time()
        client.predict(sql="SELECT count(*) FROM singer", schema=SCHEMA, api_name="/check")
        times.append(time.time() - start)
    return times


def waits_since(before: dict | None, after: dict | None) -> list[float]:
    """The waits a /usage RecentWaits snapshot (`after`) added since an earlier one (`before`)."""
    if not after or not before:
        return []
    new = after["count"] - before["count"]
    return after["recent_s"][-new:] if 0 < new <= len(after["recent_s"]) else []


def engine_use(before: dict, after: dict, wall: float) -> dict | None:
    """The batched decoder's work during a load, from /usage's engine totals: steps, requests a step, ms a step,
    prefill forwards, requests a prefill, ms a prefill, the share of prompt tokens restored from kept prefixes,
    the share of the wall time the engine was busy, and the time to a first token p50/p95 in the model's process:
    from a request's submission to the decoder (`first_token`), and, with WORKERS, from its arrival in that
    process to its first piece of text sent back (`first_piece`): what is left of the users' is the app's."""
    if "decoder" not in after or "decoder" not in before:  # no engine, or it became ready during the load
        return None
    d = {name: after["decoder"][name] - before["decoder"][name] for name in after["decoder"]}
    first_token = waits_since(before.get("first_token"), after.get("first_token"))
    first_piece = waits_since(before.get("first_piece"), after.get("first_piece"))
    ms = lambda waits, q: None if not waits else round(1e3 * percentile(waits, q), 2)  # noqa: E731
    return {"steps": d["steps"], "requests_per_step": round(d["rows"] / max(d["steps"], 1), 2),
            "step_ms": round(1e3 * d["step_s"] / max(d["steps"], 1), 3), "prefills": d["prefills"],
            "requests_per_prefill": round(d["prefilled"] / max(d["prefills"], 1), 2),
            "prefill_ms": round(1e3 * d["prefill_s"] / max(d["prefills"], 1), 2),
            "reused_share": round(d["reused_tokens"] / max(d["prompt_tokens"], 1), 3),
            "busy_share": round((d["step_s"] + d["prefill_s"]) / wall, 3),
            "first_token_p50_ms": ms(first_token, 50), "first_token_p95_ms": ms(first_token, 95),
            "first_piece_p50_ms": ms(first_piece, 50), "first_piece_p95_ms": ms(first_piece, 95)}  # fmt: skip


def load(pool: ProcessPoolExecutor, app: "App", users: int, rounds: int, new_tokens: int, client: str) -> dict:
    import psutil

    url, server = app.url, psutil.Process(app.process.pid)
    before = usage(url)
    start_at = time.time() + 1.0
    plans = [[QUESTIONS[(u + r) % len(QUESTIONS)] for r in range(rounds)] for u in range(users)]
    futures = [pool.submit(user, url, plan, new_tokens, start_at, client) for plan in plans]
    time.sleep(max(0.0, start_at - time.time()))
    processes = [server, *server.children(recursive=True)]  # with WORKERS: the model's process and the app processes

    def cpu_seconds() -> float:
        total = 0.0
        for process in processes:
            try:
                total += sum(process.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total

    cpu_before = cpu_seconds()
    per_user = [f.result() for f in futures]
    cpu = cpu_seconds() - cpu_before
    after = usage(url)
    requests = [r for rs in per_user for r in rs]
    begin = min(r["sent"] for r in requests)
    wall = max(r["done"] for r in requests) - begin
    tokens = after["tokens"] - before["tokens"]
    if after["answers"] - before["answers"] != len(requests):
        raise RuntimeError(f"/usage counted {after['answers'] - before['answers']} answers for {len(requests)} requests")
    mean = tokens / len(requests)
    each = [mean * len(rs) / sum(r["done"] - r["sent"] for r in rs) for rs in per_user]
    ttft = [r["first"] - r["sent"] for r in requests]
    latency = [r["done"] - r["sent"] for r in requests]
    return {"client": client, "users": users, "requests": len(requests), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "per_user_tokens_per_s": round(statistics.median(each), 1),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
            "tokens_per_request": round(mean, 1), "updates_per_request": round(statistics.mean(r["updates"] for r in requests), 1),
            "app_cpu_cores": round(cpu / wall, 2), "engine": engine_use(before, after, wall),
            # Each request: [user, sent (s from the load's first), time to first update, latency]: where stalls are.
            "each_request": [[u, round(r["sent"] - begin, 3), round(r["first"] - r["sent"], 3), round(r["done"] - r["sent"], 3)]
                             for u, rs in enumerate(per_user) for r in rs]}  # fmt: skip


def run_app(name: str, env: dict, args, model_dir: Path, results: dict):
    record = {"app": name, "env": env}
    results["apps"].append(record)
    app = App(model_dir, env, Path(args.log_dir) / f"app-{name}.log")
    try:
        # Spawned, not forked: a fork would copy this process's gradio_client (its threads do not survive a fork).
        with ProcessPoolExecutor(max(args.users), mp_context=multiprocessing.get_context("spawn")) as pool:
            first = pool.submit(ask, app.url, QUESTIONS[0], args.new_tokens, server_pid=app.process.pid).result(
                timeout=args.start_timeout)
            record["answers_after_s"] = round(first["done"] - time.time() + time.perf_counter() - app.started, 2)
            record["first_answer_updates"] = first["updates"]
            fast = torch.cuda.is_available() and env.get("FAST_DECODE", "1") != "0"  # else no fast backend is built
            record["meanwhile"] = answers_meanwhile(app, args.new_tokens, args.start_timeout if fast else 0)
            ready = app.wait_for(READY_LINE, max(0.0, args.start_timeout - (time.perf_counter() - app.started)) if fast else 0)
            record["fast_ready_after_s"] = None if ready is None else round(ready, 2)
            record["eager_ready_after_s"] = None if app.seen(EAGER_LINE) is None else round(app.seen(EAGER_LINE), 2)
            for key, text in (("eager_build_s", EAGER_LINE), ("fast_build_s", READY_LINE)):
                match = re.search(r"\(([\d.]+) s to build\)", next((line for _, line in app.lines if text in line), ""))
                record[key] = float(match.group(1)) if match else None
            record["gradio_cost"] = {f"check_round_trip_p{q}_s": percentile(check_round_trips(app.url, 20), q) for q in (50, 95)}
            for question in QUESTIONS:  # untimed: each prompt width's prefill graph is captured on first use
                ask(app.url, question, args.new_tokens)
            if name not in args.start_only:
                start_users(pool, app.url, max(args.users))  # after the start: it must not slow the build it times
                ttft = plain_http_ttft(app.url, QUESTIONS[0], args.new_tokens, 10)
                record["plain_http_ttft"] = {f"p{q}_s": percentile(ttft, q) for q in (50, 95)}
                record["loads"] = [load(pool, app, users, args.rounds, args.new_tokens, client)
                                   for client in args.clients for users in args.users]  # fmt: skip
    except Exception as error:  # noqa: BLE001 -- the record says what failed; the other apps still run
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    finally:
        app.stop()
        record["log_tail"] = [line.rstrip()[:300] for _, line in app.lines[-8:]] if "error" in record else None
        record["decoder_timings"] = [line.strip() for _, line in app.lines if line.startswith("Batched decoder:")]
    print(json.dumps(record), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="The JSON to write (rewritten after each app).")
    parser.add_argument("--model_dir", default="/tmp/sc2-3b-random-visible",
                        help="The random model (every token it writes is text: common.visible_tokens_only); built if missing.")
    parser.add_argument("--smoke", action="store_true", help="Tiny model on a CPU: a wiring check.")
    parser.add_argument("--users", default="1,4,16", help="Concurrent users, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3, help="Questions each user asks, one after another.")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--clients", default="gradio_client,http",
                        help="How users call /chat, comma-separated: gradio_client (it polls for messages every 50 ms; "
                             "its job read by `streamed`), gradio_client_iterator (`for update in job`, which can stall) "
                             "and/or http (plain HTTP and its event stream, as the browser does).")
    parser.add_argument("--app", action="append", help=f"name=VAR=value,VAR=value (repeatable; default {DEFAULT_APPS}).")
    parser.add_argument("--start_only", default=DEFAULT_START_ONLY, help="Comma-separated app names timed at start only (no loads).")
    parser.add_argument("--compile_cache", default=f"/tmp/starsql-serve-load-{os.getpid()}",
                        help="TORCHINDUCTOR_CACHE_DIR of every app: new (empty) at the first, kept for the restarts.")
    parser.add_argument("--start_timeout", type=float, default=300, help="Seconds an app may take to answer, and to be fast.")
    parser.add_argument("--log_dir", default=None, help="The apps' logs (default: beside --out).")
    args = parser.parse_args(argv)
    args.users = [int(u) for u in args.users.split(",")]
    args.clients = args.clients.split(",")
    if set(args.clients) - set(ASK):
        parser.error(f"--clients takes {', '.join(ASK)}, not {args.clients}")
    args.start_only = args.start_only.split(",")
    args.log_dir = args.log_dir or str(Path(args.out).parent)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.smoke and args.model_dir == parser.get_default("model_dir"):
        args.model_dir = "/tmp/sc2-smoke-random-visible"
    model_dir = ensure_model(args.model_dir, smoke=args.smoke, visible=True)
    results = {"card": card(), "new_tokens": args.new_tokens, "rounds": args.rounds, "questions": QUESTIONS, "apps": []}
    for spec in args.app or DEFAULT_APPS:
        name, _, assignments = spec.partition("=")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", args.compile_cache)
        env.setdefault("TRITON_CACHE_DIR", str(Path(args.compile_cache) / "triton"))
        run_app(name, env, args, model_dir, results)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
