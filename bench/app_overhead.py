"""Where a request's time goes in app.py: Gradio's round trip against the time inside our own functions.

    python3 bench/app_overhead.py                                   # the tiny model (random), on a CPU, under a minute
    python3 bench/app_overhead.py --adapter /tmp/ov-tiny --rounds 40
    LAZY_SESSIONS=0 python3 bench/app_overhead.py     # the HTTP parts with Gradio's own sessions

The app is imported and launched in this process (the same code as `python app.py`), then driven over HTTP
with gradio_client, so the functions it calls can be timed where they run:
- /check (a small schema, a SQL check, no model): the client's round trip p50/p95, the same call as plain HTTP
  (no gradio_client), against the time inside check_api, and inside it open_workspace, the check itself and
  the rest; the PostgreSQL dialect's check (DuckDB in a worker process) in process.
- /chat (streamed, greedy): time to the first streamed chunk from sending (gradio_client, and plain HTTP), against the backend's first
  piece (from the moment the answer asks the model) and the app's own time before it asks (input checks,
  opening the database, the prompt); updates per answer and bytes per update (the reply is re-rendered each
  update; gradio sends the difference to the previous one); our time per update (reply_markdown).
- sessions: each plain /call request starts a Gradio session (its session id is its event id): the time to start
  one, then to start one and process /check in it (Gradio's process_api, in process), the configurations it built
  and the memory each keeps, the app's (starsql/serve/gradio_sessions.py: a block's configuration built as an
  event writes it) against Gradio's own (every block's at once).
- the chat UI (respond, in process): updates per answer, the bytes of the full history each update carries
  into Gradio (which sends each update's difference to the previous one), and our time for the final one
  (the result table, chart and CSV).
- gc: a full collection's pause in this process (the objects it walks), and after freezing what startup made.
Workspace.close runs after the reply, in app.py's closing thread: its time is listed, not part of check_api's.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, free_port

QUESTION = "How many singers are there?"
CHECK_SQL = "SELECT name, age FROM singer WHERE country = 'France' ORDER BY age DESC"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="tiny-starcoder2", help="BASE_MODEL of the app.")
    parser.add_argument("--adapter", default="", help="ADAPTER of the app (empty: the base alone).")
    parser.add_argument("--rounds", type=int, default=30, help="Requests of each kind (after 3 warm-up ones).")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Tokens an answer of /chat at most.")
    parser.add_argument("--out", default="", help="Also write the numbers as JSON here.")
    return parser.parse_args()


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summary(values: list[float]) -> dict:
    """p50 / p95 in milliseconds."""
    ordered = sorted(values)
    return {"p50_ms": ms(statistics.median(ordered)), "p95_ms": ms(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))])}


class Timers:
    """Seconds spent inside wrapped functions, per call, by name; reset before each request."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, label: str | None = None):
        function, label = getattr(owner, name), label or name

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


def gc_pauses() -> dict:
    """Python's full collection walks every object the process holds while every thread waits (an answer's first
    token too): its time in this process (the app, its model, Gradio), then after app.py's freeze_long_lived_objects,
    which moves what lives now where collections do not look (undone after)."""
    import gc

    from starsql.serve.decode import freeze_long_lived_objects

    def full_collection_ms() -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - started)
        return ms(min(times))

    pauses = {"objects": len(gc.get_objects()), "full_collection_ms": full_collection_ms()}
    try:
        pauses["frozen"] = freeze_long_lived_objects()
        pauses["objects_frozen"] = gc.get_freeze_count()
        pauses["full_collection_after_freeze_ms"] = full_collection_ms()
    finally:
        gc.unfreeze()
    return pauses


def main() -> None:
    args = parse_args()
    os.environ.update(BASE_MODEL=args.base_model, ADAPTER=args.adapter, GRADIO_ANALYTICS_ENABLED="False")
    os.environ.setdefault("STARSQL_CACHE", "/tmp/starsql-bench-cache")
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    import app
    from gradio_client import Client

    from starsql.db.workspace import Workspace

    timers = Timers()
    for name in ("check_api", "open_workspace", "translate", "format_sql", "described",
                 "reply_markdown", "result_view", "markdown_table", "prompt_schema", "build_prompt", "count_tokens"):
        timers.wrap(app, name)
    timers.wrap(Workspace, "check", "Workspace.check")
    timers.wrap(Workspace, "close", "Workspace.close")
    # The backend's first piece, from the moment the answer asks the model for it.
    first_piece: list[float] = []
    generate = app.generate

    def timed_generate(*gen_args):
        asked = time.perf_counter()
        for number, piece in enumerate(generate(*gen_args)):
            if number == 0:
                first_piece.append(time.perf_counter() - asked)
            yield piece

    app.generate = timed_generate
    # gr.api bound check_api at import: route it through its wrapper (generators are timed by their parts).
    for block_fn in app.demo.fns.values():
        if block_fn.name == "check_api":
            block_fn.fn = app.check_api
    port = free_port()
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    results: dict = {"app_ready_s": round(time.perf_counter() - started, 1)}

    # /check: the round trip against our time inside it.
    trips, inside = [], defaultdict(list)
    for round_ in range(args.rounds + 3):
        timers.take()
        sent = time.perf_counter()
        answer = client.predict(CHECK_SQL, app.CONCERT_DB, "sqlite", None, api_name="/check")
        trip = time.perf_counter() - sent
        assert answer["valid"] and answer["rows"], answer
        if round_ >= 3:
            trips.append(trip)
            for name, spent in timers.take().items():
                inside[name].append(spent)
    # The same call as plain HTTP (POST, then read its event stream): the server's part of the round trip,
    # without gradio_client's own waits.
    import httpx

    plain = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/gradio_api/call/check") as http:
        for round_ in range(args.rounds + 3):
            sent = time.perf_counter()
            event = http.post("", json={"data": [CHECK_SQL, app.CONCERT_DB, "sqlite", None]}).json()["event_id"]
            stream = http.get(f"/{event}").text
            if round_ >= 3:
                plain.append(time.perf_counter() - sent)
            assert "event: complete" in stream, stream
    timers.take()
    ours = statistics.median(inside["check_api"])
    results["check"] = {
        "round_trip": summary(trips),
        "plain_http_round_trip": summary(plain),
        "inside_check_api_ms": ms(ours),
        "gradio_and_client_ms": ms(statistics.median(trips) - ours),
        "parts_p50_ms": {name: ms(statistics.median(values)) for name, values in sorted(inside.items())
                         if name != "check_api"},
    }

    # The same check in the PostgreSQL dialect, in process: DuckDB in a worker process (a spare one, started ahead).
    duck = defaultdict(list)
    for round_ in range(args.rounds + 3):
        timers.take()
        assert app.check_api(CHECK_SQL, app.CONCERT_DB, "postgres")["valid"]
        if round_ >= 3:
            for name, spent in timers.take().items():
                duck[name].append(spent)
    results["check_postgres_in_process_p50_ms"] = {name: ms(statistics.median(values))
                                                   for name, values in sorted(duck.items())}

    # /chat: first chunk against the backend's first piece; updates and their bytes.
    first_chunks, updates, chunk_bytes, per_update, inside = [], [], [], [], defaultdict(list)
    first_piece.clear()
    for round_ in range(args.rounds + 3):
        timers.take()
        sent = time.perf_counter()
        job = client.submit(QUESTION, app.CONCERT_DB, [], args.max_new_tokens, 0.0, "sqlite", None,
                            api_name="/chat")
        arrived = [(time.perf_counter() - sent, len(reply.encode())) for reply in job]  # as each update comes
        job.result()
        first, sizes = arrived[0][0], [size for _, size in arrived]
        if round_ >= 3:
            first_chunks.append(first)
            updates.append(len(sizes))
            chunk_bytes.extend(sizes)
            spent = timers.take()
            for name, value in spent.items():
                inside[name].append(value)
            per_update.append(spent.get("reply_markdown", 0.0) / max(1, len(sizes)))
    model_first = first_piece[3:]
    results["chat"] = {
        "first_chunk": summary(first_chunks),
        "backend_first_piece": summary(model_first),
        "app_before_model_p50_ms": ms(statistics.median(inside["open_workspace"])
                                      + statistics.median(inside.get("build_prompt", [0.0]))
                                      + statistics.median(inside.get("prompt_schema", [0.0]))),
        "gradio_to_first_chunk_p50_ms": ms(statistics.median(first_chunks) - statistics.median(model_first)),
        "updates_per_answer_p50": statistics.median(updates),
        "bytes_per_update_p50": statistics.median(chunk_bytes),
        "reply_markdown_per_update_ms": ms(statistics.median(per_update)),
        "parts_p50_ms": {name: ms(statistics.median(values)) for name, values in sorted(inside.items())},
    }

    # The same /chat as plain HTTP: the first "generating" event of its stream, without gradio_client's waits.
    plain_first = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/gradio_api/call/chat", timeout=60) as http:
        for round_ in range(args.rounds + 3):
            sent = time.perf_counter()
            event = http.post("", json={"data": [QUESTION, app.CONCERT_DB, [], args.max_new_tokens, 0.0, "sqlite",
                                                 None]}).json()["event_id"]
            first = None
            with http.stream("GET", f"/{event}") as stream:
                for line in stream.iter_lines():
                    if first is None and line.startswith("event: generating"):
                        first = time.perf_counter() - sent
            if round_ >= 3:
                plain_first.append(first)
    results["chat"]["plain_http_first_chunk"] = summary(plain_first)

    # Sessions: a plain /call's server side in process, a new session each (as Gradio starts one per such call), then
    # Gradio's processing of /check in it: the app's sessions (lazy_session_configs) against Gradio's own __init__.
    import asyncio
    import tracemalloc

    from gradio.state_holder import SessionState

    from starsql.serve.gradio_sessions import lazy_session_configs

    gradio_init = getattr(SessionState.__init__, "__wrapped__", SessionState.__init__)  # with LAZY_SESSIONS=0: as is
    lazy_session_configs()  # from here on (the HTTP parts above ran with the app's setting)
    check_fn = next(fn for fn in app.demo.fns.values() if fn.api_name == "check")

    def gradio_session(blocks):
        session = SessionState.__new__(SessionState)
        gradio_init(session, blocks)
        return session

    def call(start) -> SessionState:
        session = start(app.demo)
        asyncio.run(app.demo.process_api(check_fn, [CHECK_SQL, app.CONCERT_DB, "sqlite", None], state=session))
        return session

    results["plain_call_session"] = {"blocks": len(app.demo.blocks)}
    for name, start in (("gradio", gradio_session), ("app", SessionState)):
        starts, calls = [], []
        for _ in range(args.rounds + 3):
            started = time.perf_counter()
            start(app.demo)
            starts.append(time.perf_counter() - started)
            started = time.perf_counter()
            call(start)
            calls.append(time.perf_counter() - started)
        tracemalloc.start()
        kept = [call(start) for _ in range(50)]
        results["plain_call_session"][name] = {
            "start": summary(starts[3:]), "start_and_check": summary(calls[3:]),
            "configs_built": len(kept[0].config_values), "kept_kb_each": round(tracemalloc.get_traced_memory()[0] / len(kept) / 1024, 1)}
        tracemalloc.stop()
        del kept

    # chat_api in process: the replies it hands Gradio for one answer.
    replies = list(app.chat_api(QUESTION, app.CONCERT_DB, [], args.max_new_tokens, 0.0))
    results["chat"]["chat_api_replies_in_process"] = len(replies)
    results["chat"]["chat_api_distinct_replies"] = len(set(replies))

    # The chat UI's respond(), in process: what each update hands Gradio.
    history = []
    for number in range(3):  # a conversation of a few turns, as the UI carries it
        history += [{"role": "user", "content": f"Question {number}?"},
                    {"role": "assistant", "content": f"```sql\nSELECT {number}\n```\n\n✓ **Valid for this schema** (sqlite)."}]
    ui_updates, ui_bytes, ui_final = [], [], []
    for round_ in range(min(args.rounds, 10) + 1):
        timers.take()
        sizes, last = [], 0.0
        for update in app.respond(QUESTION, history, app.CONCERT_DB, "sqlite", None, args.max_new_tokens,
                                  "Greedy", 0.0):
            sizes.append(len(json.dumps(update[0], ensure_ascii=False).encode()))
        if round_ >= 1:
            spent = timers.take()
            ui_updates.append(len(sizes))
            ui_bytes.extend(sizes)
            ui_final.append(spent.get("result_view", 0.0))
    results["chat_ui"] = {
        "updates_per_answer_p50": statistics.median(ui_updates),
        "history_bytes_per_update_p50": statistics.median(ui_bytes),
        "result_view_ms_p50": ms(statistics.median(ui_final)),
    }
    results["gc"] = gc_pauses()
    client.close()
    app.demo.close()
    print(json.dumps(results, indent=1, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
